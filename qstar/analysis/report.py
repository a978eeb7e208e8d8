"""Experiments as tidy DataFrames, the paper's figures, and ``qstar report``.

An experiment directory is what ``qstar sweep`` writes (``trials.json``, ``trials/ID/``) or a
single ``qstar train`` run directory (one trial). Tables:

* ``steps``:  one row per (trial, step) of training metrics, the trial's resolved config joined
  in as ``cfg.SECTION.KEY`` columns and its varying parameters as plain columns;
* ``evals``:  one row per (trial, step, task, metric, value) -- held-out NLL rows have task
  ``heldout``; lm-eval rows come from ``eval/TASK/METRIC``;
* ``trials``: one row per trial: status, parameters, thought length, label.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from qstar.analysis.content import token_losses_and_thoughts
from qstar.analysis.experiment import (  # noqa: F401  (the report's data, re-exported)
    HELDOUT,
    Experiment,
    _trial_dirs,
    label_of,
    load_experiment,
    read_jsonl,
)
from qstar.analysis.figures import (  # noqa: F401
    _trial_order,
    fig_accuracy_vs_step,
    fig_final_vs_thought_tokens,
    fig_methods,
    fig_training_curves,
    fig_where_thinking_helps,
    final_values,
)
from qstar.analysis.plotting import save

# ---------------------------------------------------------------------------- the report
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


def write_report(
    exp_dir: str | Path,
    out: str | Path,
    analyse_model: bool = True,
    reading: str | Path | None = None,
) -> Path:
    """Write ``report.md`` and figures for an experiment; deterministic for the same inputs.

    ``reading``: a Markdown file with a written interpretation, placed under "Reading" (it is
    an input like the runs, so the report stays generated)."""
    exp = load_experiment(exp_dir)
    out = Path(out)
    figs_dir = out / "figures"
    sections = [f"# qstar report: {exp.path.name}", ""]
    for note in exp.notes:
        warnings.warn(note, stacklevel=2)
    sections += _failed_section(exp)
    if reading is not None:
        sections += ["## Reading", "", Path(reading).read_text().strip(), ""]
    evidence_sections = _evidence_sections(exp, figs_dir, analyse_model)
    sections += ["## Results", "", _md_table(results_table(exp)), ""]
    sections += _methods_section(exp, figs_dir)
    sections += evidence_sections
    sections += _figure_sections(exp, figs_dir, analyse_model)
    sections += _provenance_section(exp)
    sections += [
        "Configs: each trial's resolved `config.yaml` is in its run directory; the sweep's varying "
        "parameters:",
        "",
        _md_table(exp.trials.drop(columns=["label"], errors="ignore")),
        "",
    ]
    if exp.notes:
        sections += ["Notes: " + "; ".join(exp.notes), ""]
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.md"
    report.write_text("\n".join(sections))
    return report


def method_table(exp: Experiment) -> pd.DataFrame:
    """One row per finished trial of a methods comparison: method (the trial's label without its
    seed), seed, final held-out accuracy (``eval/qa_acc``), and each method's own figures: STaR's
    rationales kept per iteration, TRICE's acceptance rate and memory coverage, V-STaR's
    preference pairs, verifier pair accuracy, best-of-k, majority vote and pass@1."""
    import json

    rows = []
    dirs = {t: d for t, d, _ in _trial_dirs(exp.path)}
    for trial_id in _trial_order(exp):
        t = exp.trials[exp.trials.trial_id == trial_id].iloc[0]
        summary_file = dirs.get(trial_id, exp.path) / "summary.json"
        if t["status"] != "done" or not summary_file.is_file():
            continue
        summary = json.loads(summary_file.read_text())
        cfg = exp.configs.get(trial_id, {})
        method = cfg.get("train", {}).get("method", "quiet_star")
        last = summary.get("eval_last") or {}
        label = t["label"]
        row: dict[str, Any] = {
            "method": "Quiet-STaR, " + label if method == "quiet_star" else label,
            "seed": cfg.get("train", {}).get("seed"),
            "qa_acc": last.get("eval/qa_acc", math.nan),
        }
        per = summary.get("per_iteration") or []
        if per:
            row["kept per iteration"] = "/".join(str(p["kept"]) for p in per)
            row["sampled acc per iteration"] = "/".join(f"{p['sample_acc']:.2f}" for p in per)
        if method == "trice":
            row["accept rate"] = summary.get("accept_rate")
            row["memory coverage"] = summary.get("memory_coverage")
        if method == "vstar":
            row["pairs"] = summary.get("pairs")
            row["verifier pair acc"] = summary.get("verifier_pair_acc")
            for key, value in last.items():
                if key.startswith(("eval/vstar_best_of_", "eval/maj_at_", "eval/pass_at_1")):
                    row[key[5:]] = value
        rows.append(row)
    return pd.DataFrame(rows)


def _methods_section(exp: Experiment, figs_dir: Path) -> list[str]:
    """A comparison of training methods (STaR, TRICE, V-STaR, Quiet-STaR, the base model) when
    the experiment has any STaR-family trial: accuracy by method with its seed spread, each
    method's own figures per seed, and a figure."""
    methods = {c.get("train", {}).get("method", "quiet_star") for c in exp.configs.values()}
    if methods <= {"quiet_star"}:
        return []
    table = method_table(exp)
    if table.empty:
        return ["## Method comparison", "", "(no finished trial)", ""]
    summary = []
    for name, g in table.groupby("method", sort=False):
        acc = g["qa_acc"].dropna()
        summary.append(
            {
                "method": name,
                "seeds": len(g),
                "accuracy (mean)": acc.mean() if len(acc) else math.nan,
                "min": acc.min() if len(acc) else math.nan,
                "max": acc.max() if len(acc) else math.nan,
            }
        )
    n = exp.configs[next(iter(exp.configs))].get("star", {}).get("eval_questions")
    out = [
        "## Method comparison",
        "",
        f"Held-out chain-of-thought accuracy (`eval/qa_acc`: greedy, on the same {n} test "
        "questions with the same worked examples for every method; min and max over seeds):",
        "",
        _md_table(pd.DataFrame(summary)),
        "Per seed, with each method's own figures:",
        "",
        _md_table(table),
    ]
    fig = fig_methods(table)
    if fig is not None:
        save(fig, figs_dir, "methods")
        out += ["![accuracy by method](figures/methods.png)", ""]
    return out


def _evidence_sections(exp: Experiment, figs_dir: Path, analyse_model: bool = True) -> list[str]:
    """ "Does it learn?": held-out and task estimates with intervals, when the runs saved
    per-token held-out losses (:mod:`qstar.evidence`); optimisation diagnostics when logged.
    Trials that ended in error are left out."""
    from qstar.analysis import evidence as ev

    failed = set(exp.trials.trial_id[exp.trials.status == "error"])
    run_dirs = {t: d for t, d, _ in _trial_dirs(exp.path) if d.is_dir() and t not in failed}
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
    return out + _dynamics_sections(exp, run_dirs)


def _heldout_section(held: pd.DataFrame, tasks: pd.DataFrame) -> list[str]:
    from qstar.analysis import evidence as ev

    return [
        "## Does it learn?",
        "",
        "Held-out next-token NLL (nats/token) on windows never trained on, thoughts greedy. "
        "`gain` = without thinking - with thinking (> 0: thinking helps); `hardest 10%`: the "
        "tokens whose step-0 loss is in the top decile; `vs baseline` = the no-thought "
        "baseline's NLL - this arm's with thinking, same step (> 0: thinking beats training "
        "the plain LM on the same tokens); `drift` = NLL without thinking - its step-0 value "
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
    ]


def _curve_sections(arms, figs_dir: Path) -> list[str]:
    """The held-out figures and every evaluation's estimates (also written to ``curves.csv``)."""
    from qstar.analysis import evidence as ev
    from qstar.analysis import figures

    out: list[str] = []
    curves = ev.curves(arms)
    for name, title, fig in (
        (
            "heldout_vs_step",
            "Held-out NLL and the gain of thinking against step",
            figures.fig_heldout_vs_step(curves),
        ),
        (
            "gain_vs_thought_tokens",
            "Final gain against thought tokens",
            figures.fig_gain_vs_thought_tokens(curves),
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
        ),
    ):
        if fig is not None:
            save(fig, figs_dir, name)
            out += [f"### {title}", "", f"![{title}](figures/{name}.png)", ""]
    if not curves.empty:
        wide = curves.pivot_table(
            index=["arm", "step"], columns="quantity", values="value", sort=False
        )
        out += [
            "Every evaluation (point estimates; intervals in `curves.csv`):",
            "",
            _md_table(wide.reset_index()),
            "",
        ]
        figs_dir.parent.mkdir(parents=True, exist_ok=True)
        curves.to_csv(figs_dir.parent / "curves.csv", index=False, float_format="%.6f")
    return out


def _content_section(arms) -> list[str]:
    from qstar.analysis import content
    from qstar.analysis import evidence as ev

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
        ]
    return out


def _task_section(tasks: pd.DataFrame) -> list[str]:
    from qstar.analysis import evidence as ev

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
        ]
    return out


def _dynamics_sections(exp: Experiment, run_dirs: dict[str, Path]) -> list[str]:
    """Mixing weight and rewards over training; optimisation diagnostics when logged."""
    from qstar.analysis import dynamics

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
        ]
    diag = dynamics.diagnostics_table(exp, run_dirs)
    if not diag.empty:
        out += [
            "## Optimisation diagnostics",
            "",
            "Medians over training steps: the gradient norm before clipping, the factor clipping "
            "multiplied it by, the REINFORCE term's gradient over the NLL terms' on the trunk, the "
            "mixing head's gradient norm after clipping, and each step's update over the weights' "
            "norm; then the fraction of trunk weights that differ from step 0 at the end and the "
            "held-out NLL without thinking at every evaluation (`NLL@step`).",
            "",
            _md_table(diag, ".3g"),
            "",
        ]
    return out


def _task_versions(exp: Experiment) -> dict[str, Any]:
    from qstar.evaluation.lookup import TASK_DIR

    versions = {}
    tasks = set(exp.evals["task"]) - {HELDOUT} if not exp.evals.empty else set()
    for task in tasks:
        f = TASK_DIR / f"{task}.yaml"
        if f.is_file():
            text = f.read_text()
            for line in text.splitlines():
                if line.strip().startswith("version:"):
                    versions[task] = line.split(":", 1)[1].strip()
    return versions


def _short_source(source: str | None) -> str | None:
    """``"gguf:/long/path/x.gguf"`` -> ``"gguf: x.gguf"`` (the kind and the file name)."""
    if not source:
        return None
    kind, _, path = source.partition(":")
    return f"{kind}: {Path(path).name}" if path else kind


def _figure_sections(exp: Experiment, figs_dir: Path, analyse_model: bool) -> list[str]:
    """Task and training figures; with ``analyse_model``, where thinking helps and the thoughts
    with the highest reward (the longest-thought finished arm's final model)."""
    sections: list[str] = []
    figures = [
        (
            "accuracy_vs_step",
            "Task accuracy against training step (Figure 2 style)",
            fig_accuracy_vs_step(exp),
        ),
        (
            "final_vs_thought_tokens",
            "Final accuracy against thought tokens",
            fig_final_vs_thought_tokens(exp),
        ),
        ("training_curves", "Training curves", fig_training_curves(exp)),
    ]
    thoughts = None
    if analyse_model:
        candidates = exp.trials[(~exp.trials.baseline) & (exp.trials.status == "done")]
        if not candidates.empty:
            best = candidates.sort_values("thought_len").iloc[-1]
            run_dir = {t: d for t, d, _ in _trial_dirs(exp.path)}[best.trial_id]
            try:
                losses, thoughts = token_losses_and_thoughts(run_dir)
                figures.append(
                    (
                        "where_thinking_helps",
                        f"Where thinking helps ({best.label}, held-out windows)",
                        fig_where_thinking_helps(losses),
                    )
                )
            except (ValueError, OSError) as exc:  # e.g. a run whose data source is unreachable here
                exp.notes.append(f"model analyses skipped: {str(exc).splitlines()[0]}")
                warnings.warn(exp.notes[-1], stacklevel=2)
    for name, title, fig in figures:
        if fig is None:
            continue
        save(fig, figs_dir, name)
        sections += [f"## {title}", "", f"![{title}](figures/{name}.png)", ""]
    if thoughts is not None:
        sections += [
            "## Thoughts with the highest reward",
            "",
            "Held-out windows, sampled thoughts; reward = log-likelihood gain of the next tokens over "
            "the mean of the position's thoughts (nats).",
            "",
            _md_table(thoughts, ".3f"),
            "",
        ]
    return sections


def _provenance_section(exp: Experiment) -> list[str]:
    """Code version, start time, model, weights and data of every trial; task versions."""
    sections = ["## Provenance", ""]
    prov_rows = []
    for trial_id, prov in sorted(exp.provenance.items()):
        prov_rows.append(
            {
                "trial": trial_id,
                "git_sha": (prov.get("git_sha") or "-")[:12],
                "dirty": prov.get("git_dirty"),
                "started": prov.get("started"),
                "model": prov.get("model"),
                "model source": _short_source(prov.get("model_source")),
                "data": str(prov.get("data_source", ""))[-60:],
                "data origin": prov.get("data_origin"),  # local, hub or bundled (issue 12)
                "torch": prov.get("torch"),
                "transformers": prov.get("transformers"),
            }
        )
    prov_table = pd.DataFrame(prov_rows)
    for column in ("model source", "data origin"):  # absent from runs made before recording them
        if column in prov_table and prov_table[column].isna().all():
            prov_table = prov_table.drop(columns=column)
    sections += [_md_table(prov_table), ""]
    versions = _task_versions(exp)
    if versions:
        sections += [
            "Task versions: " + ", ".join(f"`{k}` {v}" for k, v in sorted(versions.items())),
            "",
        ]
    return sections


def _failed_section(exp: Experiment) -> list[str]:
    """A warning at the top when trials ended in error: which, and why (the last line of each
    ``error.txt``); they are left out of the evidence, so a diverged arm cannot read as a finding."""
    failed = exp.trials[exp.trials.status == "error"]
    if failed.empty:
        return []
    dirs = {t: d for t, d, _ in _trial_dirs(exp.path)}
    rows = []
    for trial_id in failed.trial_id:
        error = dirs[trial_id] / "error.txt"
        lines = [ln.strip() for ln in error.read_text(errors="replace").splitlines() if ln.strip()]
        rows.append({"trial": trial_id, "error": (lines[-1] if lines else "-")[:300]})
    k, n = len(failed), len(exp.trials)
    if k == n:
        text = (
            f"**No trial finished: all {n} ended in error.** Nothing in this report is evidence "
            "about the method; the tables show only what the trials logged before they failed."
        )
    else:
        text = (
            f'**{k} of {n} trials ended in error.** They are left out of "Does it learn?"; the '
            "Results table shows what they logged before they failed."
        )
    return ["## Failed trials", "", text, "", _md_table(pd.DataFrame(rows)), ""]
