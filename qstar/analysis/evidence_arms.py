"""The arms of an experiment: trials that differ only in ``train.seed``, with the held-out token
losses and per-example task scores each seed's run wrote (see :mod:`qstar.analysis.evidence`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qstar.analysis import files
from qstar.analysis.experiment import without_seed


@dataclass
class Tokens:
    """Per-token held-out NLL of one trial at one step: one array per window."""

    base: list[np.ndarray]
    thought: list[np.ndarray] | None


def arm_of(trial_id: str) -> str:
    """``t003-policy_weight=1.0e2-seed=1`` -> ``policy_weight=1.0e2`` (seed and index dropped);
    ``t004-seed=1`` (the base config, varied by seed alone) -> ``base``."""
    arm = re.sub(r"^t\d+-", "", trial_id)
    arm = re.sub(r"-?seed=\d+$", "", arm)
    if arm:
        return arm
    return "base" if re.fullmatch(r"t\d+-seed=\d+", trial_id) else trial_id


def seed_of(trial_id: str) -> int | None:
    """The ``seed=N`` a sweep's trial id ends with, if any."""
    m = re.search(r"seed=(\d+)$", trial_id)
    return int(m.group(1)) if m else None


def load_tokens(run_dir: Path) -> dict[int, Tokens]:
    """``{step: Tokens}`` from ``RUN_DIR/heldout/step_N.json[.gz]`` (empty if none)."""
    out = {}
    for f in files.matching(Path(run_dir) / "heldout", "step_*.json"):
        data = files.read_json(f)
        step = int(f.stem.split("_")[1])
        thought = data.get("thought")
        out[step] = Tokens(
            [files.floats(w, data) for w in data["base"]],
            [files.floats(w, data) for w in thought] if thought else None,
        )
    return out


def load_task_samples(run_dir: Path) -> dict[tuple[int, str], pd.DataFrame]:
    """``{(step, task): per-example frame}``; task ends in ``:nothink`` for the no-thinking run."""
    out = {}
    for f in files.matching(Path(run_dir) / "tasks", "step_*/*.jsonl"):
        step = int(f.parent.name.split("_")[1])
        rows = [json.loads(line) for line in files.read_text(f).splitlines() if line.strip()]
        out[(step, f.stem)] = pd.DataFrame(rows).set_index("doc_id").sort_index()
    return out


@dataclass
class Arm:
    name: str
    label: str
    baseline: bool
    thought_len: int
    trials: dict[str, Path]  # trial_id -> run dir (one per seed)
    tokens: dict[str, dict[int, Tokens]]  # trial_id -> step -> Tokens
    tasks: dict[str, dict[tuple[int, str], pd.DataFrame]]

    @property
    def seeds(self) -> int:
        return len(self.trials)

    def steps(self) -> list[int]:
        """Steps every seed has evaluated."""
        sets = [set(t) for t in self.tokens.values() if t]
        return sorted(set.intersection(*sets)) if sets else []


def arms_of(exp, run_dirs: dict[str, Path]) -> list[Arm]:
    """Group an :class:`qstar.analysis.experiment.Experiment`'s finished or running trials into arms."""
    arms: dict[str, Arm] = {}
    for _, t in exp.trials.iterrows():
        if t["trial_id"] not in run_dirs:
            continue
        name = arm_of(t["trial_id"])
        arm = arms.get(name)
        if arm is None:
            label = without_seed(t["label"])
            thought_len = 0 if t["baseline"] or pd.isna(t["thought_len"]) else int(t["thought_len"])
            arm = arms[name] = Arm(name, label, bool(t["baseline"]), thought_len, {}, {}, {})
        run_dir = run_dirs[t["trial_id"]]
        arm.trials[t["trial_id"]] = run_dir
        arm.tokens[t["trial_id"]] = load_tokens(run_dir)
        arm.tasks[t["trial_id"]] = load_task_samples(run_dir)
    return sorted(arms.values(), key=lambda a: (a.baseline, a.thought_len, a.name))
