"""The report's evidence: "Does it learn?" (held-out estimates with intervals, findings, curves,
the content control, tasks) and the training dynamics (see :mod:`qstar.analysis.report`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qstar.analysis import content, dynamics, figures
from qstar.analysis import evidence as ev
from qstar.analysis.experiment import Experiment
from qstar.analysis.plotting import save
from qstar.analysis.report_compute import compute_section
from qstar.analysis.report_tables import _md_table, source

HELDOUT_FILES = "`data/trials/*/heldout/step_N.json.gz`"


def _evidence_sections(exp: Experiment, figs_dir: Path, analyse_model: bool = True) -> list[str]:
    """ "Does it learn?": held-out and task estimates with intervals, when the runs saved
    per-token held-out losses (:mod:`qstar.analysis.evidence`); optimisation diagnostics when logged.
    Trials that ended in error are left out."""
    failed = set(exp.trials.trial_id[exp.trials.status == "error"])
    run_dirs = {t: d for t, d, _ in exp.trial_dirs if d.is_dir() and t not in failed}
    arms = ev.arms_of(exp, run_dirs)
    out: list[str] = []
    if any(arm.steps() for arm in arms):
        held = ev.heldout_table(arms)
        tasks = ev.task_table(arms)
        out += _heldout_section(held, tasks)
        out += _curve_sections(arms, figs_dir)
        if analyse_model:
            out += _content_section(arms)
        out += _task_section(tasks)
        out += compute_section(exp, arms, figs_dir, analyse_model)
    return out + _dynamics_sections(exp, run_dirs)


def _heldout_section(held: pd.DataFrame, tasks: pd.DataFrame) -> list[str]:
    return [
        "## Does it learn?",
        "",
        "Held-out next-token NLL (nats/token) on windows never trained on, thoughts greedy. "
        "`gain` = without thinking - with thinking (> 0: thinking helps); `hardest 10%`: the "
        "tokens whose step-0 loss is in the top decile; `vs baseline` = the no-thought "
        "baseline's NLL - this arm's with thinking, same step (> 0: thinking beats training "
        "the plain LM on the same tokens); `vs compute-matched`, where present, = the same "
        "against a no-thought baseline trained for more steps (the thinking arms' FLOPs), "
        "each at its last step; `drift` = NLL without thinking - its step-0 value "
        "(> 0: the language model got worse). Brackets: 95% percentile bootstrap over held-out "
        "windows (2000 resamples) of the values averaged over seeds; each seed's own value "
        "follows.",
        "",
        "### Findings",
        "",
        *[f"- {line}" for line in ev.findings(held, tasks)],
        "",
        "### Held-out text at the last step",
        "",
        _md_table(held.map(ev.fmt_cell) if not held.empty else held),
        "",
        source(
            f"per-token held-out NLL in {HELDOUT_FILES} of each arm's trials, N = the `step` "
            "column (and N = 0 for `drift` and the hardest tokens); the findings above read "
            "this table and the task table"
        ),
        "",
    ]


def _curve_sections(arms, figs_dir: Path) -> list[str]:
    """The held-out figures and every evaluation's estimates (also written to ``curves.csv``)."""
    out: list[str] = []
    curves = ev.curves(arms)
    every = f"per-token held-out NLL in {HELDOUT_FILES}, every N evaluated"
    for name, title, fig, where in (
        (
            "heldout_vs_step",
            "Held-out NLL and the gain of thinking against step",
            figures.fig_heldout_vs_step(curves),
            every,
        ),
        (
            "gain_vs_thought_tokens",
            "Final gain against thought tokens",
            figures.fig_gain_vs_thought_tokens(curves),
            f"per-token held-out NLL in {HELDOUT_FILES}, N = each arm's last step",
        ),
        (
            "gain_by_difficulty",
            "Gain by token difficulty (final step)",
            figures.fig_gain_by_difficulty(
                {
                    a.label: ev.gain_by_difficulty(a, a.steps()[-1])
                    for a in arms
                    if not a.baseline and a.steps()
                }
            ),
            f"per-token held-out NLL in {HELDOUT_FILES}, N = 0 (the deciles) and the last step",
        ),
    ):
        if fig is not None:
            save(fig, figs_dir, name)
            out += [f"### {title}", "", f"![{title}](figures/{name}.png)", "", source(where), ""]
    if not curves.empty:
        wide = curves.pivot_table(
            index=["arm", "step"], columns="quantity", values="value", sort=False
        )
        out += [
            "Every evaluation (point estimates; intervals in `curves.csv`):",
            "",
            _md_table(wide.reset_index()),
            "",
            source(f"{every}; the same estimates as `curves.csv`"),
            "",
        ]
        figs_dir.parent.mkdir(parents=True, exist_ok=True)
        curves.to_csv(figs_dir.parent / "curves.csv", index=False, float_format="%.6f")
    return out


def _content_section(arms) -> list[str]:
    out: list[str] = []
    table = content.content_table(arms)
    if not table.empty:
        out += [
            "### Does the content of the thought matter?",
            "",
            "Each arm's final model on the same held-out windows (fp32), with its own "
            "greedy thought and with a content-free thought that repeats the pause token "
            "`---` (the same mixing head and passes, nothing to think). `content` = NLL "
            "with the pause thought - NLL with its thought (> 0: what the thoughts say "
            "helps, beyond the extra computation and the mixing head).",
            "",
            _md_table(table.map(ev.fmt_cell)),
            "",
            source(
                "per-token NLL of each arm's final model in "
                "`data/trials/*/analysis/content_control.json.gz` (cached when the report was "
                "first made from the experiment)"
            ),
            "",
        ]
    return out


def _task_section(tasks: pd.DataFrame) -> list[str]:
    out: list[str] = []
    if not tasks.empty:
        out += [
            "### Tasks (paper protocol, zero-shot)",
            "",
            "Scores in [0, 1] at each arm's last task evaluation; brackets: 95% bootstrap over "
            "questions; `thinking - not` is paired on the same questions.",
            "",
            _md_table(tasks.map(ev.fmt_cell)),
            "",
            source(
                "per-question scores in `data/trials/*/tasks/step_N/TASK.jsonl` (thinking) and "
                "`TASK:nothink.jsonl` (not thinking), N = each arm's last task evaluation"
            ),
            "",
        ]
    return out


def _dynamics_sections(exp: Experiment, run_dirs: dict[str, Path]) -> list[str]:
    """Mixing weight and rewards over training; optimisation diagnostics when logged."""
    out: list[str] = []
    mix = dynamics.mixing_reward_table(exp)
    if not mix.empty:
        out += [
            "### Mixing weight and rewards over training",
            "",
            "Per-step means over an arm's seeds: the mixing head's output `w` (0 = the base "
            "prediction) and the REINFORCE rewards (nats; `reward_nonzero`: share of thoughts "
            "with a positive reward).",
            "",
            _md_table(mix, ".3g"),
            "",
            source("the training rows of `data/trials/*/metrics.jsonl`"),
            "",
        ]
    diag = dynamics.diagnostics_table(exp, run_dirs)
    if not diag.empty:
        out += [
            "## Optimisation diagnostics",
            "",
            dynamics.diagnostics_legend(list(diag.columns)),
            "",
            _md_table(diag, ".3g"),
            "",
            source(
                "the training rows of `data/trials/*/metrics.jsonl` (`NLL@step`: its "
                "`eval/nll_base` rows)"
            ),
            "",
        ]
    return out
