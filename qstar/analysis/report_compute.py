"""The compute-quality curve of thinking (``quiet_star.think_at``, issue 24): thought compute
per token against held-out NLL with thinking and the gain, one point per arm, and the Pareto
front. Thought compute counts model passes per text token in units of one plain forward pass:
``k f (t + 3 (t + 1 + n))`` for ``k`` thoughts per position at a fraction ``f`` of the positions
(``t`` sampled tokens forward only; the teacher-forced block of ``t + 1 + n`` tokens forward and
backward, backward counted as two forwards); the no-thought baseline is 0."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qstar.analysis import evidence as ev
from qstar.analysis.experiment import Experiment
from qstar.analysis.plotting import _plt, save
from qstar.analysis.report_tables import _md_table, source


def thought_compute(qs: dict) -> float:
    """Thought passes per text token (module docstring) of a ``quiet_star`` config section."""
    t, n, k = qs.get("thought_len", 9), qs.get("n_true", 4), qs.get("n_thoughts", 2)
    f = qs.get("think_fraction", 1.0) if qs.get("think_at", "all") != "all" else 1.0
    return k * f * (t + 3 * (t + 1 + n))


def compute_table(exp: Experiment, arms: list[ev.Arm]) -> pd.DataFrame:
    """One row per arm at its last common step: compute, NLL with thinking, gain."""
    rows = []
    for arm in arms:
        steps = arm.steps()
        if not steps:
            continue
        trial = next(iter(arm.trials))
        cfg = exp.configs.get(trial, {})
        qs = cfg.get("quiet_star", {})
        lm = cfg.get("train", {}).get("objective") == "lm"
        s = steps[-1]
        with_thought = ev.nll(arm, s, "base" if lm else "thought")
        rows.append(
            {
                "arm": arm.label,
                "think_at": "none" if lm else qs.get("think_at", "all"),
                "fraction": 0.0 if lm else qs.get("think_fraction", 1.0),
                "thought compute": 0.0 if lm else thought_compute(qs),
                "NLL with thinking": with_thought.est.value,
                "gain": None if lm else ev.gain(arm, s).est.value,
            }
        )
    return pd.DataFrame(rows)


def pareto(table: pd.DataFrame) -> pd.Series:
    """Whether each arm is on the front: no other arm has less compute and lower NLL."""
    best = []
    for _, r in table.iterrows():
        dominated = (
            (table["thought compute"] <= r["thought compute"])
            & (table["NLL with thinking"] < r["NLL with thinking"])
        ).any()
        best.append(not dominated)
    return pd.Series(best, index=table.index)


def compute_section(exp: Experiment, arms: list[ev.Arm], figs_dir: Path) -> list[str]:
    """The section, when the experiment varies where or how much it thinks."""
    table = compute_table(exp, arms)
    modes = set(table.get("think_at", []))
    if table.empty or not (modes - {"all", "none"}):
        return []
    table["on the front"] = pareto(table)
    table = table.sort_values(["thought compute", "arm"]).reset_index(drop=True)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, g in table.groupby("think_at", sort=True):
        ax.scatter(g["thought compute"], g["NLL with thinking"], label=mode)
    front = table[table["on the front"]]
    ax.plot(front["thought compute"], front["NLL with thinking"], "k--", lw=1, label="front")
    ax.set_xlabel("thought passes per text token (units of one plain forward)")
    ax.set_ylabel("held-out NLL with thinking (nats/token)")
    ax.set_title("Compute against quality of thinking")
    ax.legend(fontsize=8)
    save(fig, figs_dir, "compute_quality")
    return [
        "## Where thinking pays: compute against quality",
        "",
        "Each arm at its last evaluation: thought compute per text token (model passes in units "
        "of one plain forward: `k f (t + 3 (t + 1 + n))`, `f` the fraction of positions that "
        "think), held-out NLL with thinking and the gain (without minus with). `on the front`: "
        "no arm reaches a lower NLL with less compute.",
        "",
        _md_table(table),
        "",
        "![compute against quality](figures/compute_quality.png)",
        "",
        source(
            "each arm's held-out NLL files `data/trials/*/heldout/step_N.json.gz` and its "
            "`config.yaml`"
        ),
        "",
    ]
