"""Experiments as tidy DataFrames.

An experiment directory is what ``qstar sweep`` writes (``trials.json``, ``trials/ID/``) or a
single ``qstar train`` run directory (one trial). Tables:

* ``steps``:  one row per (trial, step) of training metrics, the trial's resolved config joined
  in as ``cfg.SECTION.KEY`` columns and its varying parameters as plain columns;
* ``evals``:  one row per (trial, step, task, metric, value) -- held-out NLL rows have task
  ``heldout``; lm-eval rows come from ``eval/TASK/METRIC``;
* ``trials``: one row per trial: status, parameters, thought length, label.

A report may also read finished trials of other experiments (``qstar report EXP --with OTHER``):
an arm already trained elsewhere on the same held-out windows (the headline's baseline, say)
joins this experiment's trials instead of being trained again; its bundle then holds them all.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from qstar.analysis import files
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
    name: str = ""  # the experiment's name (a bundle keeps its experiment's)
    bundle: dict[str, Any] = field(default_factory=dict)  # bundle.json when read from a bundle
    # (trial_id, run_dir, params) of every trial, this experiment's and those read --with
    trial_dirs: list[tuple[str, Path, dict[str, Any]]] = field(default_factory=list)
    # the other experiments trials were read from: {"name", "path", "trials"} each
    references: list[dict[str, Any]] = field(default_factory=list)


def read_jsonl(
    path: Path, allow_partial_last: bool = True, name: str | None = None
) -> tuple[list[dict], str | None]:
    """Rows of a JSON-lines file (or its ``.gz``). A malformed line raises ``ValueError`` naming
    file and line; a crashed run's last partial line (no trailing newline) is dropped and
    reported instead, as ``name`` (default: the path) and the line."""
    text = files.read_text(path)
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
                note = f"{name or path}:{i}: dropped a partial last line (a crashed or killed run)"
                continue
            raise ValueError(f"{path}:{i}: malformed metrics row ({exc.msg})") from None
    return rows, note


def _trial_dirs(path: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    if files.exists(path / "trials.json"):
        spec = files.read_json(path / "trials.json")
        return [
            (t["trial_id"], path / "trials" / t["trial_id"], t["params"]) for t in spec["trials"]
        ]
    if files.exists(path / "metrics.jsonl") or (path / "config.yaml").is_file():
        return [(path.resolve().name, path, {})]
    raise FileNotFoundError(
        f"{path} is neither a sweep experiment (trials.json) nor a run directory (metrics.jsonl)"
    )


def _referenced(
    own: set[str], sources: list[str | Path], patterns: list[str]
) -> tuple[list[tuple[str, Path, dict[str, Any]]], list[dict[str, Any]]]:
    """The trials of the experiments ``sources`` (experiment folders or report bundles) whose
    ids match one of ``patterns`` (all when none), and ``{"name", "path", "trials"}`` of each
    source; an id that clashes with another trial's (``own``: the report's own trial ids), or a
    pattern that matches nothing, fails."""
    seen = set(own)
    found, refs = [], []
    for src in map(Path, sources):
        every = _trial_dirs(src)
        trials = [
            t for t in every if not patterns or any(fnmatch.fnmatch(t[0], p) for p in patterns)
        ]
        if not trials:
            ids = ", ".join(t for t, _, _ in every)
            raise ValueError(
                f"--with {src}: no trial matches --with-trials {' '.join(patterns)}; its trials: {ids}"
            )
        for trial_id, _, _ in trials:
            if trial_id in seen:
                raise ValueError(
                    f"--with {src}: trial {trial_id} has the id of another trial of the report; "
                    "leave it out with --with-trials"
                )
            seen.add(trial_id)
        found += trials
        name = files.bundle_meta(src).get("name") or src.resolve().name
        refs.append({"name": name, "path": str(src), "trials": [t for t, _, _ in trials]})
    return found, refs


# what fixes the held-out windows: trials read --with must agree on it to be compared
HELDOUT_KEYS = ("data.val_source", "data.val_split", "data.window", "eval.windows")


def heldout_key(cfg: dict[str, Any]) -> tuple:
    """The settings that choose a trial's held-out windows (the seed resolved)."""
    flat = flatten(cfg)
    seed = flat.get("eval.heldout_seed")
    return (*(flat.get(k) for k in HELDOUT_KEYS), flat.get("train.seed") if seed is None else seed)


def _check_heldout(configs: dict[str, dict[str, Any]], referenced: list[str]) -> None:
    own = {heldout_key(c) for t, c in configs.items() if c and t not in referenced}
    for trial_id in referenced:
        key = heldout_key(configs[trial_id]) if configs.get(trial_id) else None
        if own and key is not None and key not in own:
            mine = sorted(own, key=str)[0]
            diff = [
                f"{k} {a!r} vs {b!r}"
                for k, a, b in zip((*HELDOUT_KEYS, "held-out seed"), key, mine, strict=True)
                if a != b
            ]
            raise ValueError(
                f"--with trial {trial_id} was evaluated on other held-out windows "
                f"({'; '.join(diff)}); only trials on the same windows compare"
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


SEED_SUFFIX = re.compile(r",? ?seed \d+$")


def without_seed(label: str) -> str:
    """``"4 thought tokens, n_true 2, seed 1"`` -> ``"4 thought tokens, n_true 2"``."""
    return SEED_SUFFIX.sub("", str(label))


def _add_seeds(trial_rows: list[dict[str, Any]]) -> None:
    """Labels name the seed when the trials differ by seed (else rows would repeat)."""
    if len({r["seed"] for r in trial_rows if r["seed"] is not None}) > 1:
        for r in trial_rows:
            if r["seed"] is not None and not SEED_SUFFIX.search(r["label"]):
                r["label"] = f"{r['label']}, seed {r['seed']}"


def _metric_rows(trial_id: str, rows: list[dict], cfg: dict) -> tuple[list[dict], list[dict]]:
    """A trial's ``metrics.jsonl`` rows as (step rows, eval rows) of the tidy tables."""
    step_rows, eval_rows = [], []
    flat_cfg = {
        k: ",".join(map(str, v)) if isinstance(v, list) else v
        for k, v in flatten(cfg, "cfg.").items()
    }
    for row in rows:
        if row.get("kind") != "eval":
            step_rows.append(
                {"trial_id": trial_id, **{k: v for k, v in row.items() if k != "kind"}, **flat_cfg}
            )
            continue
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
    return step_rows, eval_rows


def load_experiment(
    path: str | Path, with_: list[str | Path] = (), with_trials: list[str] = ()
) -> Experiment:
    """Read an experiment (or one run, or a report's data bundle) into tidy DataFrames; see the
    module docstring. ``with_``: other experiments or bundles whose finished trials (those
    matching a pattern of ``with_trials``, all when none) join this one's; they must have been
    evaluated on the same held-out windows."""
    path = Path(path)
    meta = files.bundle_meta(path)
    notes: list[str] = []
    trial_rows, step_rows, eval_rows = [], [], []
    configs, provenance = {}, {}
    own = _trial_dirs(path)
    extra, references = ([], [])
    if with_:
        extra, references = _referenced({t for t, _, _ in own}, list(with_), list(with_trials))
    trial_dirs = own + extra
    for trial_id, run_dir, params in trial_dirs:
        config = run_dir / "config.yaml"
        cfg = yaml.safe_load(config.read_text()) if config.is_file() else {}
        configs[trial_id] = cfg
        if files.exists(run_dir / "run.json"):
            provenance[trial_id] = files.read_json(run_dir / "run.json")
        baseline = cfg.get("train", {}).get("objective") == "lm"
        trial_rows.append(
            {
                "trial_id": trial_id,
                "status": run_status(run_dir),
                "label": label_of(cfg, params) if cfg else trial_id,
                "thought_len": 0 if baseline else cfg.get("quiet_star", {}).get("thought_len"),
                "baseline": baseline,
                "seed": cfg.get("train", {}).get("seed", params.get("train.seed")),
                **params,
            }
        )
        if not files.exists(run_dir / "metrics.jsonl"):
            continue
        rows, note = read_jsonl(run_dir / "metrics.jsonl", name=f"{trial_id}/metrics.jsonl")
        if note:
            notes.append(note)
        steps, evals = _metric_rows(trial_id, rows, cfg)
        step_rows += steps
        eval_rows += evals
    _check_heldout(configs, [t for t, _, _ in extra])
    _add_seeds(trial_rows)
    trials = pd.DataFrame(trial_rows)
    steps = pd.DataFrame(step_rows)
    evals = pd.DataFrame(eval_rows, columns=["trial_id", "step", "task", "metric", "value"])
    if not evals.empty:
        evals = evals.merge(
            trials[["trial_id", "label", "thought_len", "baseline", "seed"]], on="trial_id"
        )
    name = meta.get("name") or path.resolve().name
    references = references or meta.get("with", [])
    return Experiment(
        path, trials, steps, evals, configs, provenance, notes, name, meta, trial_dirs, references
    )
