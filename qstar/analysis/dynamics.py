"""What happened during training: mixing weight and reward statistics, and the optimisation
diagnostics of :mod:`qstar.runs.diagnostics`, as tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from qstar.analysis import files
from qstar.analysis.evidence_arms import arm_of
from qstar.analysis.experiment import without_seed


def _trial_arm(exp) -> dict[str, str]:
    labels = dict(zip(exp.trials.trial_id, exp.trials.label, strict=True))
    return {tid: without_seed(labels[tid]) for tid in labels}


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


# what each column of diagnostics_table is (medians over training steps unless said)
DIAG_TEXT = {
    "trial": "the trial",
    "grad norm": "the gradient norm before clipping",
    "clip factor": "the factor clipping multiplied it by",
    "policy/NLL grad, trunk": "the REINFORCE term's gradient norm over the NLL terms' on the trunk",
    "mixing-head grad after clip": "the mixing head's gradient norm after clipping",
    "trunk update / weights": "each step's update of the trunk over its weights' norm",
    "head update / weights": "each step's update of the mixing head over its weights' norm",
    "trunk weights changed": "the fraction of trunk weights that differ from step 0 at the end",
}


def diagnostics_legend(columns: list[str]) -> str:
    """One sentence naming exactly the columns of a diagnostics table, in order."""
    parts = [f"`{c}`: {DIAG_TEXT[c]}" for c in columns if c in DIAG_TEXT and c != "trial"]
    if any(c.startswith("NLL@") for c in columns):
        parts.append("`NLL@step`: the held-out NLL without thinking at that evaluation")
    medians = [c for c in columns if c in DIAG and c != "trial"]
    lead = "Per trial; medians over training steps for " + (
        ", ".join(f"`{c}`" for c in medians) if medians else "none"
    )
    return lead + ". Columns: " + "; ".join(parts) + "."


def diagnostics_table(exp, run_dirs: dict[str, Path]) -> pd.DataFrame:
    """Per trial: medians over steps of the optimisation diagnostics that were logged
    (:mod:`qstar.runs.diagnostics`), the fraction of trunk weights changed by the end, and the
    held-out NLL without thinking at every evaluation."""
    s = exp.steps
    if s.empty or "grad_norm/trunk" not in s.columns:
        return pd.DataFrame()
    rows = []
    labels = dict(zip(exp.trials.trial_id, exp.trials.label, strict=True))
    for tid in exp.trials.trial_id:
        d = s[s.trial_id == tid]
        if d.empty:
            continue
        row: dict[str, Any] = {"trial": labels.get(tid, arm_of(tid))}
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
    if run_dir is None or not files.exists(run_dir / "metrics.jsonl"):
        return None
    value = None
    for line in files.read_text(run_dir / "metrics.jsonl").splitlines():
        if key in line:
            try:
                value = float(json.loads(line)[key])
            except (ValueError, KeyError):
                continue
    return value
