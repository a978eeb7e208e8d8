"""Experiments as tidy DataFrames.

An experiment directory is what ``qstar sweep`` writes (``trials.json``, ``trials/ID/``) or a
single ``qstar train`` run directory (one trial). Tables:

* ``steps``:  one row per (trial, step) of training metrics, the trial's resolved config joined
  in as ``cfg.SECTION.KEY`` columns and its varying parameters as plain columns;
* ``evals``:  one row per (trial, step, task, metric, value) -- held-out NLL rows have task
  ``heldout``; lm-eval rows come from ``eval/TASK/METRIC``;
* ``trials``: one row per trial: status, parameters, thought length, label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from qstar.runs.tracking import flatten, run_status

HELDOUT = "heldout"
TRAIN_CURVES = ("base_nll", "mixed_nll", "policy_loss", "reward_mean", "mixing_weight_mean")
CURVE_LABELS = {
    "base_nll": "base NLL (nats/token)",
    "mixed_nll": "mixed NLL (nats/token)",
    "policy_loss": "policy loss",
    "reward_mean": "mean reward (nats)",
    "mixing_weight_mean": "mixing weight",
}


@dataclass
class Experiment:
    path: Path
    trials: pd.DataFrame
    steps: pd.DataFrame
    evals: pd.DataFrame
    configs: dict[str, dict[str, Any]]
    provenance: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)


def read_jsonl(path: Path, allow_partial_last: bool = True) -> tuple[list[dict], str | None]:
    """Rows of a JSON-lines file. A malformed line raises ``ValueError`` naming file and line; a
    crashed run's last partial line (no trailing newline) is dropped and reported instead."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows, note = [], None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise json.JSONDecodeError("not an object", line, 0)
            rows.append(row)
        except json.JSONDecodeError as exc:
            is_last_partial = i == len(lines) and not text.endswith("\n")
            if allow_partial_last and is_last_partial:
                note = f"{path}:{i}: dropped a partial last line (a crashed or killed run)"
                continue
            raise ValueError(f"{path}:{i}: malformed metrics row ({exc.msg})") from None
    return rows, note


def _trial_dirs(path: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    if (path / "trials.json").is_file():
        spec = json.loads((path / "trials.json").read_text())
        return [
            (t["trial_id"], path / "trials" / t["trial_id"], t["params"]) for t in spec["trials"]
        ]
    if (path / "metrics.jsonl").is_file() or (path / "config.yaml").is_file():
        return [(path.name, path, {})]
    raise FileNotFoundError(
        f"{path} is neither a sweep experiment (trials.json) nor a run directory (metrics.jsonl)"
    )


LABEL_KEYS = {
    "quiet_star.thought_len",
    "quiet_star.n_true",
    "train.objective",
    "train.seed",
    "train.method",
    "star.iterations",
    "qa.think",
    "star.think",
}


def label_of(cfg: dict[str, Any], params: dict[str, Any] | None = None) -> str:
    """``"4 thought tokens, n_true 2"``, plus any other varying parameter of the trial."""
    from qstar.experiments.sweep import _fmt  # imports the recipes and lm-eval: heavy
    from qstar.recipes import registry  # the same: heavy

    extra = ", ".join(
        f"{k.split('.')[-1]} {_fmt(v)}"
        for k, v in (params or {}).items()
        if k not in LABEL_KEYS and not k.startswith(("eval.", "logging."))
    )
    method = cfg.get("train", {}).get("method", "quiet_star")
    if method != "quiet_star":
        untrained = cfg.get("star", {}).get("iterations") == 0 and method == "star"
        known = method in registry.names()
        base = (
            "base model (untrained)"
            if untrained
            else (registry.get(method).label if known else method)
        )
    elif cfg.get("train", {}).get("objective") == "lm":
        base = "no thought (baseline)"
    else:
        qs = cfg.get("quiet_star", {})
        base = f"{qs.get('thought_len')} thought tokens, n_true {qs.get('n_true')}"
    return f"{base}, {extra}" if extra else base


def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment (or one run) into tidy DataFrames; see the module docstring."""
    path = Path(path)
    notes: list[str] = []
    trial_rows, step_rows, eval_rows = [], [], []
    configs, provenance = {}, {}
    for trial_id, run_dir, params in _trial_dirs(path):
        cfg = (
            yaml.safe_load((run_dir / "config.yaml").read_text())
            if (run_dir / "config.yaml").is_file()
            else {}
        )
        configs[trial_id] = cfg
        if (run_dir / "run.json").is_file():
            provenance[trial_id] = json.loads((run_dir / "run.json").read_text())
        status = run_status(run_dir)
        baseline = cfg.get("train", {}).get("objective") == "lm"
        thought_len = 0 if baseline else cfg.get("quiet_star", {}).get("thought_len")
        trial_rows.append(
            {
                "trial_id": trial_id,
                "status": status,
                "label": label_of(cfg, params) if cfg else trial_id,
                "thought_len": thought_len,
                "baseline": baseline,
                "seed": cfg.get("train", {}).get("seed"),
                **params,
            }
        )
        metrics = run_dir / "metrics.jsonl"
        if not metrics.is_file():
            continue
        rows, note = read_jsonl(metrics)
        if note:
            notes.append(note)
        flat_cfg = {
            k: ",".join(map(str, v)) if isinstance(v, list) else v
            for k, v in flatten(cfg, "cfg.").items()
        }
        for row in rows:
            if row.get("kind") == "eval":
                for key, value in row.items():
                    if not key.startswith("eval/") or not isinstance(value, int | float):
                        continue
                    parts = key.split("/")
                    task, metric = (
                        (HELDOUT, parts[1]) if len(parts) == 2 else (parts[1], "/".join(parts[2:]))
                    )
                    eval_rows.append(
                        {
                            "trial_id": trial_id,
                            "step": row["step"],
                            "task": task,
                            "metric": metric,
                            "value": float(value),
                        }
                    )
            else:
                step_rows.append(
                    {
                        "trial_id": trial_id,
                        **{k: v for k, v in row.items() if k != "kind"},
                        **flat_cfg,
                    }
                )
    trials = pd.DataFrame(trial_rows)
    steps = pd.DataFrame(step_rows)
    evals = pd.DataFrame(eval_rows, columns=["trial_id", "step", "task", "metric", "value"])
    if not evals.empty:
        evals = evals.merge(
            trials[["trial_id", "label", "thought_len", "baseline", "seed"]], on="trial_id"
        )
    return Experiment(path, trials, steps, evals, configs, provenance, notes)
