"""Data parallelism on CPU: two gloo processes launched by torchrun."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qstar.tracking import read_metrics


def _train(run_dir, nproc: int, *overrides: str):
    base = [
        sys.executable,
        "-m",
        "qstar.cli",
        "train",
        "debug_tiny",
        "--run-dir",
        str(run_dir),
        "logging.progress=false",
        *overrides,
    ]
    if nproc > 1:
        base = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "qstar.cli",
            *base[3:],
        ]
    out = subprocess.run(base, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_two_process_data_parallel_equals_one_process(tmp_path):
    """The plain-LM objective has no sampling: 2 processes x 2 sequences must equal 1 x (2 x 2)."""
    common = [
        "train.objective=lm",
        "data.windowing=pack",
        "train.steps=3",
        "train.batch_size=4",
        "train.micro_batch_size=2",
        "eval.every=0",
        "eval.windows=0",
    ]
    _train(tmp_path / "one", 1, *common)
    _train(tmp_path / "two", 2, *common)
    a = load_file(str(tmp_path / "one" / "checkpoints" / "step_000003" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step_000003" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
    la = [
        r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r["kind"] == "train"
    ]
    lb = [
        r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r["kind"] == "train"
    ]
    assert la == pytest.approx(lb, rel=1e-5)


def test_quiet_star_data_parallel_run(tmp_path):
    run = tmp_path / "run"
    _train(
        run,
        2,
        "train.steps=4",
        "train.batch_size=4",
        "train.micro_batch_size=1",
        "train.checkpoint_every=2",
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["policy_loss"] >= 0 for r in rows)
    rng = torch.load(run / "checkpoints" / "step_000004" / "rng.pt", weights_only=True)
    assert len(rng["rank_generators"]) == 2 and not torch.equal(*rng["rank_generators"])
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "qstar.cli",
            "train",
            "debug_tiny",
            "--run-dir",
            str(tmp_path / "bad"),
            "logging.progress=false",
            "train.batch_size=2",
            "train.micro_batch_size=2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "micro_batch_size x processes" in bad.stderr
