"""The report's other sections: failed trials, the method comparison, the task and training
figures with the thoughts of highest reward, and provenance (see :mod:`qstar.analysis.report`)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from qstar.analysis.content import token_losses_and_thoughts
from qstar.analysis.experiment import HELDOUT, Experiment, _trial_dirs
from qstar.analysis.figures import (
    fig_accuracy_vs_step,
    fig_final_vs_thought_tokens,
    fig_methods,
    fig_training_curves,
    fig_where_thinking_helps,
)
from qstar.analysis.plotting import save
from qstar.analysis.report_tables import _md_table, method_table


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


def _task_versions(exp: Experiment) -> dict[str, Any]:
    from qstar.evaluation.lookup import TASK_DIR  # qstar.evaluation loads lm-eval: heavy

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
