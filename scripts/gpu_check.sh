#!/usr/bin/env bash
# The whole GPU check of the performance issue, for one H100/H200 (< 8 minutes): the GPU parity
# tests, then the benchmark of a 0.5B Qwen2-shaped random model in bf16 at L=256,
# (thought_len, n_true) = (9,4) and (21,12), k=2, beside the plain step and the dense path.
# Needs torch + transformers on the machine; nothing is installed from the network.
# Figures go to $OUT (the device tool's folder) or reports/bench/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-reports/bench/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
if python -c "import pytest" 2>/dev/null; then
    timeout 240 python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
fi
timeout 300 python -m qstar.cli bench --sizes qwen2-0.5b --lengths 256 --configs 9:4,21:12 --k 2 --batch 4 \
    --dtype bfloat16 --device cuda --repeats 3 --dense-limit-gb 60 --fused-ce chunked --out "$OUT" 2>&1 | tee "$OUT/bench.log"
