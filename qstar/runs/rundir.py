"""The run directory of a training run: refusing to overwrite one, checking that a resume uses
the same config, and what is written before step 0.

Run directory (written before step 0, read by sweeps and reports):
    config.yaml            the resolved configuration
    run.json               provenance: git sha, versions, model and data sources, command
    heldout.json           the validation windows (token ids) behind eval/nll_*
    metrics.jsonl          one JSON row per step (kind "train") and per evaluation (kind "eval")
    heldout/step_N.json    per-token held-out NLL of each evaluation
    tasks/step_N/          per-example task scores
    tb/                    TensorBoard events
    checkpoints/step_N/    see :mod:`qstar.runs.checkpoint`; checkpoints/latest names the newest
    final/                 the trained model (``QuietStar.from_pretrained`` loads it)
    summary.json           final figures
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from qstar.run_config import RunConfig, load_run_config
from qstar.runs import checkpoint
from qstar.runs.tracking import provenance


def check_run_dir(run_dir: Path, cfg: RunConfig, resume: bool) -> Path | None:
    """Refuse to overwrite a run; on resume, require the same config. Returns the checkpoint."""
    existing = run_dir / "config.yaml"
    if not resume:
        if existing.exists() or (run_dir / "checkpoints").exists():
            raise ValueError(
                f"run directory {run_dir} already holds a run; pass --resume to continue "
                "it, or choose another --run-dir"
            )
        return None
    if existing.exists():
        saved = load_run_config(str(existing)).to_dict()
        diffs = _diff(saved, cfg.to_dict())
        if diffs:
            raise ValueError(
                f"--resume with a different config than {existing}: {', '.join(diffs[:5])}; "
                "resume with the same config and overrides"
            )
    return checkpoint.latest(run_dir)


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, separators=(",", ":")) + "\n")
    tmp.replace(path)


def start_run_dir(
    run_dir: Path, cfg: RunConfig, main: bool, resume: bool, ckpt: Path | None, info: dict[str, Any]
) -> None:
    """What every run writes before its first step: ``config.yaml`` and, for a new run,
    ``run.json`` (provenance and ``info``: model and data sources). A resume without a
    checkpoint starts over."""
    if not main:
        return
    if resume and ckpt is None:
        print(f"qstar: no checkpoint in {run_dir}; starting from step 0", file=sys.stderr)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    if ckpt is None:
        (run_dir / "run.json").write_text(json.dumps(provenance(info), indent=2) + "\n")


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """``summary.json``: a run's final figures (its presence marks the run done)."""
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
