"""Does it learn? Held-out token losses and task scores of an experiment, with intervals.

Reads what ``qstar train`` writes at every evaluation: ``heldout/step_N.json`` (the per-token
NLL of every held-out window without thinking, ``base``, and after a greedy thought,
``thought``) and ``tasks/step_N/TASK[:nothink].jsonl`` (per-example task scores). Trials that
differ only in ``train.seed`` form one *arm*. Every comparison is paired on the same tokens or
questions and carries a 95% percentile bootstrap interval (:mod:`qstar.stats`) over held-out
windows or questions; across seeds, per-window values are averaged first (seeds share the
held-out windows when ``eval.heldout_seed`` is fixed), so the interval is over text, and the
seeds' own values are listed beside it.

Signs: ``gain`` = NLL without thinking - NLL with thinking (positive: thinking helps);
``vs baseline`` = the no-thought baseline's NLL - this arm's NLL with thinking, at the same step
(positive: thinking beats training the plain LM on the same tokens); ``drift`` = NLL without
thinking - its step-0 value (positive: the language model got worse).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qstar.analysis import stats
from qstar.analysis.stats import Estimate

HARD_FRACTION = 0.1  # "hardest decile": tokens with the top 10% step-0 base NLL


@dataclass
class Tokens:
    """Per-token held-out NLL of one trial at one step: one array per window."""

    base: list[np.ndarray]
    thought: list[np.ndarray] | None


def arm_of(trial_id: str) -> str:
    """``t003-policy_weight=1.0e2-seed=1`` -> ``policy_weight=1.0e2`` (seed and index dropped)."""
    arm = re.sub(r"^t\d+-", "", trial_id)
    arm = re.sub(r"-?seed=\d+$", "", arm)
    return arm or trial_id


def load_tokens(run_dir: Path) -> dict[int, Tokens]:
    """``{step: Tokens}`` from ``RUN_DIR/heldout/step_N.json`` (empty if none)."""
    out = {}
    folder = Path(run_dir) / "heldout"
    for f in sorted(folder.glob("step_*.json")) if folder.is_dir() else []:
        data = json.loads(f.read_text())
        step = int(f.stem.split("_")[1])
        thought = data.get("thought")
        out[step] = Tokens(
            [np.asarray(w, dtype=np.float64) for w in data["base"]],
            [np.asarray(w, dtype=np.float64) for w in thought] if thought else None,
        )
    return out


def load_task_samples(run_dir: Path) -> dict[tuple[int, str], pd.DataFrame]:
    """``{(step, task): per-example frame}``; task ends in ``:nothink`` for the no-thinking run."""
    out = {}
    folder = Path(run_dir) / "tasks"
    for f in sorted(folder.glob("step_*/*.jsonl")) if folder.is_dir() else []:
        step = int(f.parent.name.split("_")[1])
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        out[(step, f.stem)] = pd.DataFrame(rows).set_index("doc_id").sort_index()
    return out


# ---------------------------------------------------------------------------- arms
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
    """Group an :class:`qstar.analysis.Experiment`'s finished or running trials into arms."""
    arms: dict[str, Arm] = {}
    for _, t in exp.trials.iterrows():
        if t["trial_id"] not in run_dirs:
            continue
        name = arm_of(t["trial_id"])
        arm = arms.get(name)
        if arm is None:
            label = re.sub(r",? ?seed \d+$", "", str(t["label"]))
            thought_len = 0 if t["baseline"] or pd.isna(t["thought_len"]) else int(t["thought_len"])
            arm = arms[name] = Arm(name, label, bool(t["baseline"]), thought_len, {}, {}, {})
        run_dir = run_dirs[t["trial_id"]]
        arm.trials[t["trial_id"]] = run_dir
        arm.tokens[t["trial_id"]] = load_tokens(run_dir)
        arm.tasks[t["trial_id"]] = load_task_samples(run_dir)
    return sorted(arms.values(), key=lambda a: (a.baseline, a.thought_len, a.name))


@dataclass
class Row:
    """One estimate (bootstrap over windows of the seed-averaged values) and each seed's value."""

    est: Estimate
    seeds: list[float]
    signed: bool = True  # a difference (printed with its sign) rather than a level

    def fmt(self, digits: int = 4) -> str:
        text = self.est.fmt(digits, sign=self.signed)
        if len(self.seeds) > 1:
            f = f"{{:{'+' if self.signed else ''}.{digits}f}}"
            text += " (seeds " + ", ".join(f.format(v) for v in self.seeds) + ")"
        return text


Windows = list[tuple[np.ndarray, np.ndarray]]  # per window: (per-token values, selected)


def _combine(per_seed: list[Windows]) -> Row:
    """Per-window sums and counts, averaged over seeds when the windows match (else pooled)."""
    sums = [np.array([float(v[m].sum()) for v, m in ws]) for ws in per_seed]
    counts = [np.array([float(m.sum()) for _, m in ws]) for ws in per_seed]
    seeds = [float(s.sum() / max(c.sum(), 1)) for s, c in zip(sums, counts, strict=True)]
    if all(len(ws) == len(per_seed[0]) for ws in per_seed) and all(
        [len(v) for v, _ in ws] == [len(v) for v, _ in per_seed[0]] for ws in per_seed
    ):
        est = stats.ratio_bootstrap(np.mean(sums, axis=0), np.mean(counts, axis=0))
    else:
        est = stats.ratio_bootstrap(np.concatenate(sums), np.concatenate(counts))
    return Row(est, seeds)


def _estimate(arm: Arm, step: int, fn) -> Row | None:
    """``fn(trial_id, Tokens) -> Windows | None`` for every seed at ``step``, combined."""
    per_seed = []
    for trial_id, steps in arm.tokens.items():
        if step not in steps:
            continue
        windows = fn(trial_id, steps[step])
        if windows is None:
            return None
        per_seed.append(windows)
    return _combine(per_seed) if per_seed else None


def _all(values: list[np.ndarray]) -> Windows:
    return [(v, np.ones(len(v), dtype=bool)) for v in values]


def _hard_mask(arm: Arm, trial_id: str) -> list[np.ndarray] | None:
    """Hardest decile by this trial's step-0 base NLL (the starting model's difficulty)."""
    first = arm.tokens[trial_id].get(0)
    if first is None:
        return None
    cut = np.quantile(np.concatenate(first.base), 1 - HARD_FRACTION)
    return [w >= cut for w in first.base]


def nll(arm: Arm, step: int, which: str = "base") -> Row | None:
    """Held-out NLL without (``base``) or with (``thought``) thinking."""

    def fn(_, tok: Tokens):
        values = tok.base if which == "base" else tok.thought
        return None if values is None else _all(values)

    row = _estimate(arm, step, fn)
    if row is not None:
        row.signed = False
    return row


def gain(arm: Arm, step: int, hard: bool = False) -> Row | None:
    """NLL without - with thinking (positive: thinking helps), optionally on the hardest decile."""

    def fn(trial_id, tok: Tokens):
        if tok.thought is None:
            return None
        diffs = [b - t for b, t in zip(tok.base, tok.thought, strict=True)]
        if not hard:
            return _all(diffs)
        mask = _hard_mask(arm, trial_id)
        return None if mask is None else list(zip(diffs, mask, strict=True))

    return _estimate(arm, step, fn)


def drift(arm: Arm, step: int) -> Row | None:
    """NLL without thinking at ``step`` - at step 0 (positive: the LM got worse)."""

    def fn(trial_id, tok: Tokens):
        first = arm.tokens[trial_id].get(0)
        if first is None:
            return None
        return _all([b - b0 for b, b0 in zip(tok.base, first.base, strict=True)])

    return _estimate(arm, step, fn)


def vs_baseline(arm: Arm, baseline: Arm, step: int) -> Row | None:
    """Baseline NLL - this arm's NLL with thinking at the same step; seeds paired in order."""
    refs = [baseline.tokens[b].get(step) for b in sorted(baseline.tokens)]
    per_seed = []
    for tid, ref in zip(sorted(arm.tokens), refs, strict=False):
        tok = arm.tokens[tid].get(step)
        if tok is None or ref is None or tok.thought is None:
            continue
        if [len(w) for w in tok.thought] != [len(w) for w in ref.base]:
            return None  # not the same held-out windows
        per_seed.append(_all([r - t for r, t in zip(ref.base, tok.thought, strict=True)]))
    return _combine(per_seed) if per_seed else None


# ---------------------------------------------------------------------------- tables
def heldout_table(arms: list[Arm], step: int | None = None) -> pd.DataFrame:
    """One row per arm at ``step`` (default: the last step all its seeds evaluated)."""
    baseline = next((a for a in arms if a.baseline), None)
    rows = []
    for arm in arms:
        steps = arm.steps()
        if not steps:
            continue
        s = step if step is not None and step in steps else steps[-1]
        row: dict[str, Any] = {"arm": arm.label, "seeds": arm.seeds, "step": s}
        for key, value in (
            ("NLL without thinking", nll(arm, s, "base")),
            ("NLL with thinking", None if arm.baseline else nll(arm, s, "thought")),
            ("gain", None if arm.baseline else gain(arm, s)),
            ("gain, hardest 10%", None if arm.baseline else gain(arm, s, hard=True)),
            (
                "vs baseline",
                None if arm.baseline or baseline is None else vs_baseline(arm, baseline, s),
            ),
            ("drift since step 0", drift(arm, s)),
        ):
            row[key] = value
        rows.append(row)
    return pd.DataFrame(rows)


def curves(arms: list[Arm]) -> pd.DataFrame:
    """Long table (arm, step, quantity, value, lo, hi) of every estimate at every step."""
    baseline = next((a for a in arms if a.baseline), None)
    rows = []
    for arm in arms:
        for s in arm.steps():
            items = {"nll_base": nll(arm, s, "base"), "drift": drift(arm, s)}
            if not arm.baseline:
                items.update(
                    nll_thought=nll(arm, s, "thought"),
                    gain=gain(arm, s),
                    gain_hard=gain(arm, s, hard=True),
                    vs_baseline=vs_baseline(arm, baseline, s) if baseline else None,
                )
            for q, r in items.items():
                if r is not None:
                    rows.append(
                        {
                            "arm": arm.label,
                            "thought_len": arm.thought_len,
                            "baseline": arm.baseline,
                            "step": s,
                            "quantity": q,
                            "value": r.est.value,
                            "lo": r.est.lo,
                            "hi": r.est.hi,
                        }
                    )
    return pd.DataFrame(
        rows, columns=["arm", "thought_len", "baseline", "step", "quantity", "value", "lo", "hi"]
    )


def gain_by_difficulty(arm: Arm, step: int, bins: int = 10) -> pd.DataFrame:
    """Gain per decile of step-0 base NLL (pooled over seeds), bootstrapped over windows."""
    rows = []
    per_seed = []
    for steps in arm.tokens.values():
        tok, first = steps.get(step), steps.get(0)
        if tok is None or first is None or tok.thought is None:
            continue
        flat = np.concatenate(first.base)
        edges = np.quantile(flat, np.linspace(0, 1, bins + 1))
        per_seed.append(
            [
                (b - t, np.clip(np.searchsorted(edges, b0, side="right") - 1, 0, bins - 1))
                for b, t, b0 in zip(tok.base, tok.thought, first.base, strict=True)
            ]
        )
    if not per_seed:
        return pd.DataFrame(columns=["decile", "value", "lo", "hi"])
    windows = [w for seed in per_seed for w in seed]
    for k in range(bins):
        est = stats.ratio_bootstrap(
            np.array([d[b == k].sum() for d, b in windows]),
            np.array([(b == k).sum() for _, b in windows]),
        )
        rows.append({"decile": k + 1, "value": est.value, "lo": est.lo, "hi": est.hi})
    return pd.DataFrame(rows)


TASK_METRICS = ("soft_score", "acc")


def task_table(arms: list[Arm], metrics=TASK_METRICS) -> pd.DataFrame:
    """Per arm, task and metric at the arm's last task evaluation: the score thinking and not,
    and the paired difference, each bootstrapped over questions (seeds pooled as more questions)."""
    rows = []
    for arm in arms:
        found: dict[str, dict[str, list[pd.DataFrame]]] = {}
        for samples in arm.tasks.values():
            if not samples:
                continue
            last = max(step for step, _ in samples)
            for (step, task), frame in samples.items():
                if step != last:
                    continue
                base_task, _, mode = task.partition(":")
                found.setdefault(base_task, {}).setdefault(mode or "think", []).append(frame)
        for task, modes in sorted(found.items()):
            for metric in metrics:
                row: dict[str, Any] = {"arm": arm.label, "task": task, "metric": metric}
                think = modes.get("think", [])
                nothink = modes.get("nothink", [])
                col_think = "score" if arm.baseline else "thinking"
                if think and all(metric in f for f in think):
                    row[col_think] = stats.mean_bootstrap(
                        np.concatenate([f[metric].to_numpy() for f in think])
                    )
                    row["questions"] = len(think[0])
                if nothink and all(metric in f for f in nothink):
                    row["not thinking"] = stats.mean_bootstrap(
                        np.concatenate([f[metric].to_numpy() for f in nothink])
                    )
                    diffs = [
                        (a[metric] - b[metric]).dropna().to_numpy()
                        for a, b in zip(think, nothink, strict=False)
                    ]
                    row["thinking - not"] = stats.mean_bootstrap(np.concatenate(diffs))
                rows.append(row)
    return pd.DataFrame(rows)


def fmt_cell(value: Any, digits: int = 4) -> str:
    if isinstance(value, Row):
        return value.fmt(digits)
    if isinstance(value, Estimate):
        return value.fmt(digits)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


# ---------------------------------------------------------------------------- findings
# (column of heldout_table, sentence up to the verdict, verdict if > 0, verdict if < 0)
FINDINGS = (
    (
        "drift since step 0",
        "NLL without thinking moved {value} since step 0 (",
        "the language model got worse",
        "the language model improved",
    ),
    (
        "gain",
        "thinking changes held-out NLL by {value} nats/token, without minus with (",
        "thinking helps",
        "thinking hurts",
    ),
    (
        "gain, hardest 10%",
        "on the hardest 10% of tokens the gain is {value} (",
        "thinking helps",
        "thinking hurts",
    ),
    (
        "vs baseline",
        "against the no-thought baseline at the same step, {value} (baseline minus with thinking: ",
        "thinking beats training the plain LM",
        "the plain LM is better",
    ),
)


def findings(held: pd.DataFrame, tasks: pd.DataFrame) -> list[str]:
    """Plain sentences read off the tables: each names the estimate and its interval."""
    out = []

    def verdict(row: Row, pos: str, neg: str) -> str:
        if row.est.lo > 0:
            return pos
        if row.est.hi < 0:
            return neg
        return "no difference detectable at this size"

    for _, r in held.iterrows():
        arm, step = r["arm"], int(r["step"])
        for column, text, pos, neg in FINDINGS:
            row = r.get(column)
            if isinstance(row, Row):
                value = row.est.fmt(4, sign=True)
                out.append(
                    f"{arm}, step {step}: {text.format(value=value)}{verdict(row, pos, neg)})."
                )
    for _, r in tasks.iterrows() if not tasks.empty else []:
        diff = r.get("thinking - not")
        if isinstance(diff, Estimate):
            v = (
                "no difference detectable"
                if not diff.excludes_zero()
                else ("thinking helps" if diff.lo > 0 else "thinking hurts")
            )
            out.append(
                f"{r['arm']}, {r['task']} {r['metric']}: thinking minus not "
                f"{diff.fmt(1, scale=100, sign=True)} points ({v})."
            )
    return out
