"""The compute-quality curve of thinking (``quiet_star.think_at``, issue 24): thought compute
per token against held-out NLL with thinking and the gain, one point per arm, and the Pareto
front. Thought compute counts model passes per text token in units of one plain forward pass:
``k f (t + 3 (t + 1 + n))`` for ``k`` thoughts per position at a fraction ``f`` of the positions
(``t`` sampled tokens forward only; the teacher-forced block of ``t + 1 + n`` tokens forward and
backward, backward counted as two forwards); the no-thought baseline is 0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from qstar.analysis import content
from qstar.analysis import evidence as ev
from qstar.analysis.experiment import Experiment
from qstar.analysis.plotting import _plt, save
from qstar.analysis.report_tables import _md_table, source
from qstar.runs.tracking import flatten


def thought_compute(qs: dict) -> float:
    """Thought passes per text token (module docstring) of a ``quiet_star`` config section."""
    t, n, k = qs.get("thought_len", 9), qs.get("n_true", 4), qs.get("n_thoughts", 2)
    f = qs.get("think_fraction", 1.0) if qs.get("think_at", "all") != "all" else 1.0
    return k * f * (t + 3 * (t + 1 + n))


# settings that say where and how much a trial thinks; an arm thinking at a fraction is compared
# with the all-positions arm whose other settings are the same
WHERE_KEYS = ("think_at", "think_fraction", "gate", "gate_loss_weight")


def _setting(cfg: dict) -> dict:
    """The config without where it thinks, its seed and its bookkeeping."""
    flat = flatten({k: v for k, v in cfg.items() if k not in ("eval", "logging")})
    drop = {f"quiet_star.{k}" for k in WHERE_KEYS} | {"train.seed"}
    return {k: v for k, v in flat.items() if k not in drop}


def matching_arm(
    exp: Experiment, arm: ev.Arm, arms: list[ev.Arm], think_at: str, fraction: float | None = None
) -> ev.Arm | None:
    """The arm that thinks ``think_at`` (at ``fraction``, for a rule that chooses) with ``arm``'s
    other settings, if there is one: ``all`` gives the all-positions arm, ``random`` the
    control at the same fraction."""
    mine = _setting(exp.configs.get(next(iter(arm.trials)), {}))
    for other in arms:
        cfg = exp.configs.get(next(iter(other.trials)), {})
        qs = cfg.get("quiet_star", {})
        if other is arm or other.baseline or qs.get("think_at", "all") != think_at:
            continue
        if fraction is not None and qs.get("think_fraction", 1.0) != fraction:
            continue
        if _setting(cfg) == mine:
            return other
    return None


def compute_table(exp: Experiment, arms: list[ev.Arm]) -> pd.DataFrame:
    """One row per arm at its last common step: compute, NLL with thinking, gain (and the
    estimates with intervals the report prints: the gain, and for an arm that thinks at a fraction
    the all-positions arm's and the random control's NLL with thinking minus its own, paired by
    seed)."""
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
        everywhere = qs.get("think_at", "all") == "all"
        fraction = qs.get("think_fraction", 1.0)
        ref = None if lm or everywhere else matching_arm(exp, arm, arms, "all")
        control = (
            matching_arm(exp, arm, arms, "random", fraction)
            if qs.get("think_at") in ("hardest", "gate")
            else None
        )
        gain = None if lm else ev.gain(arm, s)
        rows.append(
            {
                "arm": arm.label,
                "think_at": "none" if lm else qs.get("think_at", "all"),
                "fraction": 0.0 if lm else 1.0 if everywhere else fraction,
                "thought compute": 0.0 if lm else thought_compute(qs),
                "NLL with thinking": with_thought.est.value,
                "gain": None if gain is None else gain.est.value,
                "gain [95%]": gain,
                "all positions - this": None
                if ref is None
                else ev.vs_baseline(arm, ref, s, which="thought"),
                "random - this": None
                if control is None
                else ev.vs_baseline(arm, control, s, which="thought"),
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


def compute_section(
    exp: Experiment, arms: list[ev.Arm], figs_dir: Path, analyse_model: bool = True
) -> list[str]:
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
    shown = table.drop(columns=["gain"]).rename(columns={"gain [95%]": "gain"})
    for col in ("gain", "all positions - this", "random - this"):
        shown[col] = shown[col].map(ev.fmt_cell)
    return [
        "## Where thinking pays: compute against quality",
        "",
        "Each arm at its last evaluation: thought compute per text token (model passes in units "
        "of one plain forward: `k f (t + 3 (t + 1 + n))`, `f` the fraction of positions that "
        "think in training), held-out NLL with thinking (at every position, greedy) and the gain "
        "(without minus with), with 95% intervals over windows; `all positions - this`: the arm "
        "that thinks at every position with the same other settings, its NLL with thinking minus "
        "this arm's (> 0: this arm is better), paired by seed; `random - this`: the same against "
        "the arm thinking at random positions at the same fraction (the control of `hardest` and "
        "`gate`). `on the front`: no arm reaches a lower NLL with less compute.",
        "",
        _md_table(shown),
        "",
        "![compute against quality](figures/compute_quality.png)",
        "",
        source(
            "each arm's held-out NLL files `data/trials/*/heldout/step_N.json.gz` and its "
            "`config.yaml`"
        ),
        "",
        *(_gate_section(exp, arms) if analyse_model else []),
    ]


def _gate_section(exp: Experiment, arms: list[ev.Arm]) -> list[str]:
    """The gate at inference: the final model's held-out NLL thinking at every position and only
    where its gate says (the content control's ``gated`` tokens)."""
    rows = []
    for arm in arms:
        per_seed = [content.content_control(d) for d in arm.trials.values()]
        per_seed = [t for t in per_seed if t is not None and "gated" in t]
        if arm.baseline or not per_seed:
            continue
        cfg = exp.configs.get(next(iter(arm.trials)), {})

        def level(which, seeds=per_seed):
            row = content.per_window(seeds, lambda seed, w: seed[which][w])
            row.signed = False
            return row

        fraction = cfg.get("quiet_star", {}).get("think_fraction", 1.0)
        scores = [np.concatenate(t["gate"]) for t in per_seed if "gate" in t]
        rows.append(
            {
                "arm": arm.label,
                "thinks at": f"the gate's top {fraction:g}",
                # the predicted gain above which that share of held-out positions lies
                "threshold": float(np.mean([np.quantile(g, 1 - fraction) for g in scores]))
                if scores
                else None,
                "NLL, no thinking": level("base"),
                "NLL, thinking everywhere": level("thought"),
                "NLL, thinking where the gate says": level("gated"),
                "everywhere - gated": content.per_window(
                    per_seed, lambda seed, w: seed["thought"][w] - seed["gated"][w]
                ),
            }
        )
    if not rows:
        return []
    table = pd.DataFrame(rows)
    for col in table.columns[3:]:
        table[col] = table[col].map(ev.fmt_cell)
    return [
        "### The gate at inference",
        "",
        "The final model of each gated arm on the held-out windows: without thinking, thinking "
        "at every position, and thinking only at the positions its gate ranks in the top "
        "fraction of each window (the rest keep the no-thought prediction; a thought depends on "
        "the text before it alone, so it is the same thought either way). `everywhere - gated` "
        "> 0: thinking only where the gate says is better. 95% intervals over windows. "
        "`threshold`: the predicted gain above which that share of the held-out positions lies "
        "(`--think-threshold` for gated generation and evaluation at about that share).",
        "",
        _md_table(table),
        "",
        source("`data/trials/ID/analysis/content_control.json.gz` (computed once from `final/`)"),
        "",
    ]
