"""The report's tables: Markdown rendering of a DataFrame, the per-trial results and the
comparison of training methods (see :mod:`qstar.analysis.report`)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from qstar.analysis import files
from qstar.analysis.experiment import HELDOUT, Experiment, without_seed
from qstar.analysis.figures import _trial_order

_INT_COLUMNS = {
    "steps",
    "thought_len",
    "seed",
    "quiet_star.thought_len",
    "quiet_star.n_true",
    "quiet_star.n_thoughts",
    "train.seed",
    "pairs",
    "seeds",
    "qa_n",
}


def source(where: str) -> str:
    """The line under a table or figure that says which files of the report's data bundle
    (``data/``, beside report.md) it was computed from."""
    return f"Source: {where}."


def _md_table(frame: pd.DataFrame, floatfmt: str = ".4f") -> str:
    if frame.empty:
        return "(none)\n"
    cols = list(frame.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if isinstance(v, float):
                cells.append(
                    ""
                    if math.isnan(v)
                    else str(int(v))
                    if c in _INT_COLUMNS
                    # an lr of 1e-6 must not print as 0.0000
                    else format(v, ".3g")
                    if 0 < abs(v) < 1e-3
                    else format(v, floatfmt)
                )
            else:
                cells.append(str(v).replace("|", "\\|").replace("\n", "⏎"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_table(exp: Experiment) -> pd.DataFrame:
    """One row per trial: label, status, steps, final held-out NLL and task metrics."""
    rows = []
    for trial_id in _trial_order(exp):
        t = exp.trials[exp.trials.trial_id == trial_id].iloc[0]
        row: dict[str, Any] = {"trial": trial_id, "label": t["label"], "status": t["status"]}
        s = exp.steps[exp.steps.trial_id == trial_id] if not exp.steps.empty else exp.steps
        row["steps"] = int(s["step"].max()) if not s.empty else 0
        e = exp.evals[exp.evals.trial_id == trial_id] if not exp.evals.empty else exp.evals
        if not e.empty:
            last = e.sort_values("step").groupby(["task", "metric"]).tail(1)
            for _, r in last.iterrows():
                name = r["metric"] if r["task"] == HELDOUT else f"{r['task']} {r['metric']}"
                row[name] = r["value"]
        rows.append(row)
    return pd.DataFrame(rows)


def _method_figures(method: str, summary: dict[str, Any]) -> dict[str, Any]:
    """The method's own columns (its recipe's ``report_figures``)."""
    from qstar.recipes import registry  # loads every recipe and lm-eval: heavy

    try:
        return registry.get(method).recipe.report_figures(summary)
    except ValueError:  # a method this install does not have
        return {}


def method_table(exp: Experiment) -> pd.DataFrame:
    """One row per finished trial of a methods comparison: method (the trial's label without its
    seed), seed, final held-out accuracy (``eval/qa_acc``), and each method's own figures: STaR's
    rationales kept per iteration, TRICE's acceptance rate and memory coverage, V-STaR's
    preference pairs, verifier pair accuracy, best-of-k, majority vote and pass@1."""
    rows = []
    dirs = {t: d for t, d, _ in exp.trial_dirs}
    for trial_id in _trial_order(exp):
        t = exp.trials[exp.trials.trial_id == trial_id].iloc[0]
        summary_file = dirs.get(trial_id, exp.path) / "summary.json"
        if t["status"] != "done" or not files.exists(summary_file):
            continue
        summary = files.read_json(summary_file)
        cfg = exp.configs.get(trial_id, {})
        method = cfg.get("train", {}).get("method", "quiet_star")
        last = summary.get("eval_last") or {}
        label = without_seed(t["label"])
        row: dict[str, Any] = {
            "method": "Quiet-STaR, " + label if method == "quiet_star" else label,
            "seed": cfg.get("train", {}).get("seed"),
            "qa_acc": last.get("eval/qa_acc", math.nan),
        }
        row.update(_method_figures(method, summary))
        rows.append(row)
    return pd.DataFrame(rows)
