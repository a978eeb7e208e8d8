"""The paper's figures at any scale: accuracy and held-out NLL against step, final values against
thought tokens, where thinking helps by token difficulty, training curves."""

from __future__ import annotations

import pandas as pd

from qstar.analysis.experiment import CURVE_LABELS, HELDOUT, TRAIN_CURVES, Experiment
from qstar.analysis.plotting import _plt


def _trial_order(exp: Experiment) -> list[str]:
    t = exp.trials.sort_values(["baseline", "thought_len", "trial_id"], na_position="last")
    return list(t["trial_id"])


def fig_accuracy_vs_step(exp: Experiment, metrics=("soft_score", "acc")):
    """Figure 2 style: task accuracy against training step, one line per trial, baseline dashed."""
    plt = _plt()
    tasks = (
        sorted(t for t in exp.evals["task"].unique() if t != HELDOUT) if not exp.evals.empty else []
    )
    if not tasks:
        return None
    fig, axes = plt.subplots(
        len(tasks), len(metrics), figsize=(5.5 * len(metrics), 3.6 * len(tasks)), squeeze=False
    )
    for r, task in enumerate(tasks):
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            for trial_id in _trial_order(exp):
                d = exp.evals[
                    (exp.evals.trial_id == trial_id)
                    & (exp.evals.task == task)
                    & (exp.evals.metric == metric)
                ]
                if d.empty:
                    continue
                d = d.sort_values("step")
                ax.plot(
                    d["step"],
                    d["value"] * 100,
                    marker="o",
                    linestyle="--" if d["baseline"].iloc[0] else "-",
                    label=d["label"].iloc[0],
                )
            ax.set_title(f"{task}: {metric}")
            ax.set_xlabel("training step")
            ax.set_ylabel(f"{metric} (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            labels,
            loc="lower center",
            ncol=min(4, len(labels)),
            bbox_to_anchor=(0.5, -0.02),
        )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def final_values(exp: Experiment, task: str, metric: str) -> pd.DataFrame:
    """The last evaluation of each trial for ``task``/``metric``."""
    d = exp.evals[(exp.evals.task == task) & (exp.evals.metric == metric)]
    if d.empty:
        return d
    return d.sort_values("step").groupby("trial_id").tail(1)


def fig_final_vs_thought_tokens(exp: Experiment, metrics=("soft_score", "acc")):
    """Final task scores against the number of thought tokens (0 = the baseline), spread over
    seeds; in an experiment without tasks, the final held-out NLL without thinking."""
    plt = _plt()
    tasks = (
        sorted(t for t in exp.evals["task"].unique() if t != HELDOUT) if not exp.evals.empty else []
    )
    pairs = [(t, m) for t in tasks for m in metrics] or [(HELDOUT, "nll_base")]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.8 * len(pairs), 3.6), squeeze=False)
    for ax, (task, metric) in zip(axes[0], pairs, strict=True):
        d = final_values(exp, task, metric)
        if d.empty:
            continue
        scale = 1 if task == HELDOUT else 100
        g = d.groupby("thought_len")["value"].agg(["mean", "std", "count"]).reset_index()
        g["std"] = g["std"].fillna(0.0)
        ax.errorbar(
            g["thought_len"], g["mean"] * scale, yerr=g["std"] * scale, marker="o", capsize=4
        )
        ax.set_xlabel("thought tokens (0 = no-thought baseline)")
        if task == HELDOUT and metric == "nll_base":
            ax.set_ylabel("final held-out NLL (nats/token)")
            title = "held-out NLL without thinking"
        else:
            ax.set_ylabel(f"final {metric}" + (" (%)" if scale == 100 else ""))
            title = f"{task}: {metric}"
        ax.set_title(
            title + (f" (n={int(g['count'].max())} seeds)" if g["count"].max() > 1 else "")
        )
    fig.tight_layout()
    return fig


def fig_training_curves(exp: Experiment, keys=TRAIN_CURVES):
    """Base NLL, mixed NLL, policy loss, mean reward and mixing weight against step."""
    plt = _plt()
    keys = [k for k in keys if k in exp.steps.columns]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    labels = dict(zip(exp.trials.trial_id, exp.trials.label, strict=True))
    for ax, key in zip(axes[0], keys, strict=True):
        for trial_id in _trial_order(exp):
            d = exp.steps[exp.steps.trial_id == trial_id].dropna(subset=[key])
            if not d.empty:
                ax.plot(d["step"], d[key], label=labels.get(trial_id, trial_id))
        ax.set_xlabel("training step")
        ax.set_ylabel(CURVE_LABELS.get(key, key))
        if key == "policy_loss":
            ax.set_yscale("symlog", linthresh=1e-4)
    handles, lab = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles, lab, loc="lower center", ncol=min(4, len(lab)), bbox_to_anchor=(0.5, -0.04)
        )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def fig_where_thinking_helps(token_losses: pd.DataFrame, bins: int = 10):
    """Mean loss improvement (base - with thought) by the base model's per-token loss percentile."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    d = token_losses.copy()
    d["percentile_bin"] = pd.qcut(d["base_nll"].rank(method="first"), bins, labels=False)
    d["improvement"] = d["base_nll"] - d["thought_nll"]
    g = d.groupby("percentile_bin")["improvement"].agg(["mean", "sem"]).reset_index()
    x = (g["percentile_bin"] + 0.5) * (100 / bins)
    ax.bar(x, g["mean"], width=100 / bins * 0.85, yerr=g["sem"].fillna(0), capsize=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("base-model token loss percentile (harder ->)")
    ax.set_ylabel("loss improvement with thought (nats)")
    fig.tight_layout()
    return fig


def fig_heldout_vs_step(table: pd.DataFrame):
    """Left: held-out NLL with thinking (no-thought baseline: without) against step, per arm.
    Right: the gain of thinking (without - with) against step, with 95% intervals (paired on
    the same tokens, bootstrapped over windows)."""
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


def fig_methods(table: pd.DataFrame):
    """Held-out chain-of-thought accuracy by method: the mean over seeds as a bar, each seed as
    a dot (``table``: :func:`qstar.analysis.report.method_table`'s per-seed rows)."""
    plt = _plt()
    if table.empty:
        return None
    order = list(dict.fromkeys(table["method"]))
    fig, ax = plt.subplots(figsize=(1.3 * len(order) + 2.0, 3.4))
    for i, name in enumerate(order):
        vals = table[table["method"] == name]["qa_acc"].dropna() * 100
        if vals.empty:
            continue
        ax.bar(i, vals.mean(), color="#9ecae1", width=0.6)
        ax.plot([i] * len(vals), vals, "o", color="#08519c")
    ax.set_xticks(range(len(order)), order, rotation=20, ha="right")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("chain-of-thought accuracy by method (dots: seeds)")
    fig.tight_layout()
    return fig
