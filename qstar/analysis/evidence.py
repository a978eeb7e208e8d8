"""Does it learn? Held-out token losses and task scores of an experiment, with intervals.

Reads what ``qstar train`` writes at every evaluation: ``heldout/step_N.json`` (the per-token
NLL of every held-out window without thinking, ``base``, and after a greedy thought,
``thought``) and ``tasks/step_N/TASK[:nothink].jsonl`` (per-example task scores). Trials that
differ only in ``train.seed`` form one *arm*. Every comparison is paired on the same tokens or
questions and carries a 95% percentile bootstrap interval (:mod:`qstar.analysis.stats`) over held-out
windows or questions; across seeds, per-window values are averaged first (seeds share the
held-out windows when ``eval.heldout_seed`` is fixed), so the interval is over text, and the
seeds' own values are listed beside it.

Signs: ``gain`` = NLL without thinking - NLL with thinking (positive: thinking helps);
``vs baseline`` = the no-thought baseline's NLL - this arm's NLL with thinking, at the same step
(positive: thinking beats training the plain LM on the same tokens); ``vs compute-matched`` =
the same against a no-thought baseline trained for more steps than the thinking arms (given
their FLOPs), at each one's last step; ``drift`` = NLL without
thinking - its step-0 value (positive: the language model got worse).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from qstar.analysis import stats
from qstar.analysis.evidence_arms import (  # noqa: F401  (re-exported: evidence's public face)
    Arm,
    Tokens,
    arm_of,
    arms_of,
    load_task_samples,
    load_tokens,
)
from qstar.analysis.evidence_estimates import (  # noqa: F401  (re-exported)
    HARD_FRACTION,
    Row,
    Windows,
    _all,
    _combine,
    _estimate,
    _hard_mask,
    drift,
    gain,
    nll,
    vs_baseline,
)
from qstar.analysis.stats import Estimate


# ---------------------------------------------------------------------------- tables
def baselines(arms: list[Arm]) -> tuple[Arm | None, list[Arm]]:
    """The token-matched no-thought baseline (trained no longer than the thinking arms) and the
    compute-matched ones (no-thought arms trained for more steps than any thinking arm)."""
    bases = [a for a in arms if a.baseline and a.steps()]
    thinking = [a.steps()[-1] for a in arms if not a.baseline and a.steps()]
    if not thinking:
        return (bases[0] if bases else None), []
    token = [b for b in bases if b.steps()[-1] <= max(thinking)]
    compute = [b for b in bases if b.steps()[-1] > max(thinking)]
    return (token[0] if token else None), compute


def heldout_table(arms: list[Arm], step: int | None = None) -> pd.DataFrame:
    """One row per arm at ``step`` (default: the last step all its seeds evaluated)."""
    baseline, compute = baselines(arms)
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
        for cm in sorted(compute, key=lambda b: b.steps()[-1])[-1:]:  # the longest
            row["vs compute-matched"] = (
                None if arm.baseline else vs_baseline(arm, cm, s, cm.steps()[-1])
            )
        rows.append(row)
    return pd.DataFrame(rows)


def curves(arms: list[Arm]) -> pd.DataFrame:
    """Long table (arm, step, quantity, value, lo, hi) of every estimate at every step."""
    baseline, _ = baselines(arms)
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
    """An estimate with at least ``digits`` decimals, more where a small one would print as
    0.0000."""
    if isinstance(value, Row):
        return value.fmt(value.est.digits(least=digits))
    if isinstance(value, Estimate):
        return value.fmt(value.digits(least=digits))
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
    (
        "vs compute-matched",
        "against the no-thought baseline given the same compute (its last step), {value} "
        "(baseline minus with thinking: ",
        "thinking beats the compute-matched plain LM",
        "the compute-matched plain LM is better",
    ),
)


def findings(held: pd.DataFrame, tasks: pd.DataFrame) -> list[str]:
    """Plain sentences read off the tables: each names the estimate and its interval; a verdict
    only where the interval excludes zero ("no difference resolved" otherwise)."""
    out = []

    def verdict(est: Estimate, pos: str, neg: str) -> str:
        return {1: pos, -1: neg}.get(est.sign(), "no difference resolved at this size")

    for _, r in held.iterrows():
        arm, step = r["arm"], int(r["step"])
        for column, text, pos, neg in FINDINGS:
            row = r.get(column)
            if isinstance(row, Row):
                value = row.est.fmt(row.est.digits(least=4), sign=True)
                out.append(
                    f"{arm}, step {step}: {text.format(value=value)}{verdict(row.est, pos, neg)})."
                )
    for _, r in tasks.iterrows() if not tasks.empty else []:
        diff = r.get("thinking - not")
        if isinstance(diff, Estimate):
            value = diff.fmt(diff.digits(scale=100), scale=100, sign=True)
            out.append(
                f"{r['arm']}, {r['task']} {r['metric']}: thinking minus not {value} points "
                f"({verdict(diff, 'thinking helps', 'thinking hurts')})."
            )
    return out
