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


# ---------------------------------------------------------------------------- figures
def fig_heldout_vs_step(table: pd.DataFrame):
    """Left: held-out NLL with thinking (no-thought baseline: without) against step, per arm.
    Right: the gain of thinking (without - with) against step, with 95% intervals (paired on
    the same tokens, bootstrapped over windows)."""
    from qstar.analysis.plotting import _plt

    plt = _plt()
    if table.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for arm, d in table.groupby("arm", sort=False):
        base = bool(d["baseline"].iloc[0])
        q = d[d.quantity == ("nll_base" if base else "nll_thought")].sort_values("step")
        style = dict(linestyle="--" if base else "-", marker="o", label=arm)
        # no band here: every arm is scored on the same windows, so the level's spread over
        # windows says nothing about the differences between arms (the right panel and the
        # table's paired columns do)
        line = axes[0].plot(q["step"], q["value"], **style)[0]
        g = d[d.quantity == "gain"].sort_values("step")
        if not g.empty:
            axes[1].plot(g["step"], g["value"], color=line.get_color(), marker="o", label=arm)
            axes[1].fill_between(g["step"], g["lo"], g["hi"], alpha=0.15, color=line.get_color())
    axes[0].set_ylabel("held-out NLL (nats/token)")
    axes[0].set_title("with thinking (dashed: the no-thought baseline)")
    axes[1].axhline(0, color="black", linewidth=0.8)
    axes[1].set_ylabel("gain: NLL without - with thinking")
    axes[1].set_title("what the thought adds (> 0 helps)")
    for ax in axes:
        ax.set_xlabel("training step")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=min(4, len(labels)), bbox_to_anchor=(0.5, -0.05)
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def fig_gain_vs_thought_tokens(table: pd.DataFrame):
    """Final gain (and final advantage over the baseline) against thought tokens."""
    from qstar.analysis.plotting import _plt

    plt = _plt()
    d = table[~table.baseline]
    if d.empty:
        return None
    last = d[d.step == d.groupby("arm")["step"].transform("max")]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for q, label in (
        ("gain", "without - with thinking"),
        ("vs_baseline", "baseline - with thinking"),
    ):
        g = last[last.quantity == q].sort_values("thought_len")
        for arm, r in g.groupby("arm", sort=False):
            x = r["thought_len"].to_numpy() + (0.08 if q == "vs_baseline" else 0.0)
            ax.errorbar(
                x,
                r["value"],
                yerr=[r["value"] - r["lo"], r["hi"] - r["value"]],
                marker="o" if q == "gain" else "s",
                capsize=4,
                linestyle="none",
                label=f"{label}: {arm}",
            )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("thought tokens")
    ax.set_ylabel("held-out NLL difference (nats)")
    ax.set_title("final step, 95% intervals over held-out windows")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def fig_gain_by_difficulty(per_arm: dict[str, pd.DataFrame]):
    """Gain of thinking per decile of the starting model's token loss, one panel per arm."""
    from qstar.analysis.plotting import _plt

    plt = _plt()
    per_arm = {k: v for k, v in per_arm.items() if not v.empty}
    if not per_arm:
        return None
    cols = min(4, len(per_arm))
    rows = -(-len(per_arm) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharey=True
    )
    for ax in axes.flat[len(per_arm) :]:
        ax.set_visible(False)
    for ax, (arm, d) in zip(axes.flat, per_arm.items(), strict=False):
        ax.bar(
            d["decile"],
            d["value"],
            yerr=[d["value"] - d["lo"], d["hi"] - d["value"]],
            capsize=3,
            width=0.8,
        )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(arm, fontsize=8)
        ax.set_xlabel("decile of step-0 token loss (harder ->)", fontsize=8)
        ax.set_ylabel("gain: without - with (nats)", fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- training-time tables
def _trial_arm(exp) -> dict[str, str]:
    labels = dict(zip(exp.trials.trial_id, exp.trials.label, strict=True))
    return {tid: re.sub(r",? ?seed \d+$", "", str(labels[tid])) for tid in labels}


def mixing_reward_table(exp, points: int = 4) -> pd.DataFrame:
    """Mixing weight and reward statistics at a few steps, averaged over an arm's seeds."""
    cols = ["mixing_weight_mean", "mixing_weight_std", "reward_mean", "reward_nonzero"]
    s = exp.steps
    if s.empty or not set(cols) <= set(s.columns):
        return pd.DataFrame()
    s = s.dropna(subset=["mixing_weight_mean"]).copy()
    if s.empty:
        return pd.DataFrame()
    s["arm"] = s["trial_id"].map(_trial_arm(exp))
    rows = []
    for arm, d in s.groupby("arm", sort=False):
        last = int(d["step"].max())
        marks = sorted({max(1, round(last * k / points)) for k in range(1, points + 1)} | {1})
        for m in marks:
            at = d[d.step == m]
            if at.empty:
                continue
            rows.append({"arm": arm, "step": m, **{c: float(at[c].mean()) for c in cols}})
    return pd.DataFrame(rows)


DIAG = {
    "grad norm": "grad_norm",
    "clip factor": "grad_clip_coef",
    "policy/NLL grad, trunk": ("grad_norm/policy/trunk", "grad_norm/nll/trunk"),
    "mixing-head grad after clip": ("grad_norm/mixing_head", "grad_clip_coef"),
    "trunk update / weights": "update_rel/trunk",
    "head update / weights": "update_rel/mixing_head",
}


def diagnostics_table(exp, run_dirs: dict[str, Path]) -> pd.DataFrame:
    """Per trial: medians over steps of the optimisation diagnostics that were logged
    (:mod:`qstar.diagnostics`), the fraction of trunk weights changed by the end, and the
    held-out NLL without thinking at every evaluation."""
    s = exp.steps
    if s.empty or "grad_norm/trunk" not in s.columns:
        return pd.DataFrame()
    rows = []
    for tid in exp.trials.trial_id:
        d = s[s.trial_id == tid]
        if d.empty:
            continue
        row: dict[str, Any] = {"trial": arm_of(tid)}
        for name, key in DIAG.items():
            if isinstance(key, tuple):
                if not set(key) <= set(d.columns) or d[key[0]].isna().all():
                    continue
                if name.startswith("policy"):
                    value = (d[key[0]] / d[key[1]].where(d[key[1]] > 0)).median()
                else:
                    value = (d[key[0]] * d[key[1]]).median()
            elif key in d.columns and not d[key].isna().all():
                value = d[key].median()
            else:
                continue
            row[name] = float(value)
        changed = _last_metric(run_dirs.get(tid), "changed_frac/trunk")
        if changed is not None:
            row["trunk weights changed"] = changed
        e = exp.evals[(exp.evals.trial_id == tid) & (exp.evals.metric == "nll_base")]
        for _, r in e.sort_values("step").iterrows():
            row[f"NLL@{int(r['step'])}"] = float(r["value"])
        rows.append(row)
    return pd.DataFrame(rows)


def _last_metric(run_dir: Path | None, key: str) -> float | None:
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return None
    value = None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if key in line:
            try:
                value = float(json.loads(line)[key])
            except (ValueError, KeyError):
                continue
    return value


# ---------------------------------------------------------------------------- findings
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
        d = r.get("drift since step 0")
        if isinstance(d, Row):
            out.append(
                f"{arm}, step {step}: NLL without thinking moved {d.est.fmt(4, sign=True)} since "
                f"step 0 ({verdict(d, 'the language model got worse', 'the language model improved')})."
            )
        g = r.get("gain")
        if isinstance(g, Row):
            out.append(
                f"{arm}, step {step}: thinking changes held-out NLL by {g.est.fmt(4, sign=True)} "
                f"nats/token, without minus with ({verdict(g, 'thinking helps', 'thinking hurts')})."
            )
        h = r.get("gain, hardest 10%")
        if isinstance(h, Row):
            out.append(
                f"{arm}, step {step}: on the hardest 10% of tokens the gain is {h.est.fmt(4, sign=True)} "
                f"({verdict(h, 'thinking helps', 'thinking hurts')})."
            )
        b = r.get("vs baseline")
        if isinstance(b, Row):
            out.append(
                f"{arm}, step {step}: against the no-thought baseline at the same step, "
                f"{b.est.fmt(4, sign=True)} (baseline minus with thinking: "
                f"{verdict(b, 'thinking beats training the plain LM', 'the plain LM is better')})."
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


# ---------------------------------------------------------------------------- content control
def content_control(run_dir: Path, batch_size: int = 8) -> dict[str, list[np.ndarray]] | None:
    """Per-token held-out NLL of the trial's final model without thinking (``base``), after its
    greedy thought (``thought``) and after a content-free thought that repeats the pause token
    ``---`` (``fixed``): the same mixing head and passes, nothing to think. In fp32; cached in
    ``RUN_DIR/analysis/content_control.json`` (keyed by the final model file)."""
    import torch

    from qstar.core.model import QuietStar
    from qstar.data import collate

    run_dir = Path(run_dir)
    final = run_dir / "final"
    weights = next(iter(sorted(final.glob("*.safetensors"))), None)
    windows_file = run_dir / "heldout.json"
    if weights is None or not windows_file.is_file():
        return None
    key = f"{weights.stat().st_size}-{int(weights.stat().st_mtime)}"
    cache = run_dir / "analysis" / "content_control.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return {k: [np.asarray(w) for w in v] for k, v in saved["tokens"].items()}
    windows = json.loads(windows_file.read_text())["windows"]
    if not windows:
        return None
    qs = QuietStar.from_pretrained(final).eval()
    pause = qs.tokenizer.encode(qs.config.meta_init_text, add_special_tokens=False)[0]
    out: dict[str, list[np.ndarray]] = {"base": [], "thought": [], "fixed": []}
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            ids, mask = collate(windows[i : i + batch_size], qs.fill_id)
            valid = (mask[:, 1:] & mask[:, :-1]).bool()
            tgt = ids[:, 1:, None]
            for name, logits in (
                ("base", qs.base_logits(ids, mask)),
                ("thought", qs.mixed_logits(ids, mask)),
                ("fixed", qs.mixed_logits(ids, mask, fixed_thought=pause)),
            ):
                nll = -torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tgt)[..., 0]
                out[name] += [row[v].double().numpy() for row, v in zip(nll, valid, strict=True)]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(
        json.dumps({"key": key, "tokens": {k: [w.tolist() for w in v] for k, v in out.items()}})
    )
    return out


def content_table(arms: list[Arm]) -> pd.DataFrame:
    """Per arm (final models): the gain of its thoughts, of a content-free pause thought, and the
    difference -- what the thoughts' *content* adds -- each bootstrapped over windows."""
    rows = []
    for arm in arms:
        if arm.baseline:
            continue
        per_seed = [content_control(d) for d in arm.trials.values()]
        per_seed = [t for t in per_seed if t is not None]
        if not per_seed:
            continue

        def combine(fn, seeds=per_seed):
            return _combine([_all([fn(t, w) for w in range(len(t["base"]))]) for t in seeds])

        rows.append(
            {
                "arm": arm.label,
                "seeds": len(per_seed),
                "gain, its thoughts": combine(lambda t, w: t["base"][w] - t["thought"][w]),
                "gain, pause thought": combine(lambda t, w: t["base"][w] - t["fixed"][w]),
                "content: pause - its thoughts": combine(
                    lambda t, w: t["fixed"][w] - t["thought"][w]
                ),
            }
        )
    return pd.DataFrame(rows)
