"""Experiment tracking: ``metrics.jsonl`` always, TensorBoard and MLflow optionally, provenance.

Every row of ``metrics.jsonl`` is one JSON object with ``kind`` (``"train"`` or ``"eval"``) and
``step``; training rows carry the loss parts, reward and mixing-weight statistics, ``lr``,
``grad_norm``, ``tokens_per_s`` and ``peak_mem_mb``; evaluation rows carry ``eval/...`` keys.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from qstar.errors import write_failed
from qstar.version import __version__


def git_info() -> dict[str, Any]:
    """The qstar source's git commit and whether it has uncommitted changes (if a checkout)."""
    root = Path(__file__).resolve().parents[2]  # the checkout: qstar/runs/tracking.py
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--", "qstar"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
        )
        return {"git_sha": sha, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def provenance(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch
    import transformers

    info = {
        "qstar_version": __version__,
        **git_info(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "pid": os.getpid(),
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
    }
    info.update(extra or {})
    return info


class MetricsLogger:
    """Append rows to ``metrics.jsonl`` and mirror numbers to TensorBoard / MLflow."""

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = True,
        mlflow: bool = False,
        mlflow_uri: str | None = None,
        experiment: str = "qstar",
        params: dict | None = None,
        keep_lines: int | None = None,
    ):
        self.path = run_dir / "metrics.jsonl"
        if keep_lines is not None:
            truncate_lines(self.path, keep_lines)
        self._fh = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))
            except ImportError:
                print(
                    "qstar: tensorboard is not installed; skipping TensorBoard events",
                    file=sys.stderr,
                )
        self._mlflow = None
        if mlflow:
            import mlflow as _mlflow

            _mlflow.set_tracking_uri(mlflow_uri or (run_dir.parent / "mlruns").resolve().as_uri())
            _mlflow.set_experiment(experiment)
            _mlflow.start_run(run_name=run_dir.name)
            if params:
                _mlflow.log_params({k: str(v)[:250] for k, v in flatten(params).items()})
            self._mlflow = _mlflow

    def log(self, row: dict[str, Any]) -> None:
        try:
            self._fh.write(json.dumps(row, sort_keys=True) + "\n")
            self._fh.flush()
        except OSError as exc:
            raise write_failed(
                self.path, exc, "the lines up to the last checkpoint are kept by --resume"
            ) from exc
        step = int(row.get("step", 0))
        numbers = {
            k: float(v)
            for k, v in row.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"
        }
        if self._tb is not None:
            prefix = "" if row.get("kind") == "eval" else "train/"
            for key, value in numbers.items():
                self._tb.add_scalar(prefix + key, value, step)
        if self._mlflow is not None:
            self._mlflow.log_metrics(
                {k.replace("/", "."): v for k, v in numbers.items()}, step=step
            )

    def line_count(self) -> int:
        self._fh.flush()
        with self.path.open(encoding="utf-8") as fh:
            return sum(1 for _ in fh)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._mlflow is not None:
            self._mlflow.end_run()


STATUS_DONE, STATUS_ERROR, STATUS_PENDING, STATUS_STOPPED = "done", "error", "pending", "stopped"


def run_status(run_dir: Path) -> str:
    """``done`` (summary.json), ``error`` (error.txt), ``stopped`` (started, unfinished) or ``pending``."""
    if (run_dir / "summary.json").is_file():
        return STATUS_DONE
    if (run_dir / "error.txt").is_file():
        return STATUS_ERROR
    if (run_dir / "config.yaml").is_file():
        return STATUS_STOPPED
    return STATUS_PENDING


def truncate_lines(path: Path, keep: int) -> None:
    """Keep the first ``keep`` lines of ``path`` (rows written after the resumed checkpoint)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)[:keep]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b": value}`` (with ``prefix`` before every key)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
