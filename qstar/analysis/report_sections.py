"""The report's other sections: failed trials, the method comparison, the task and training
figures with the thoughts of highest reward, and provenance (see :mod:`qstar.analysis.report`)."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from qstar.analysis import content
from qstar.analysis.experiment import HELDOUT, Experiment
from qstar.analysis.figures import (
    fig_accuracy_vs_step,
    fig_final_vs_thought_tokens,
    fig_methods,
    fig_training_curves,
    fig_where_thinking_helps,
)
from qstar.analysis.plotting import save
from qstar.analysis.report_tables import _md_table, method_table, source


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
    return out + [
        source("`eval_last` and each method's own figures in `data/trials/*/summary.json`"),
        "",
    ]


def _task_versions(exp: Experiment) -> dict[str, Any]:
    """``version:`` of each task's YAML (a data bundle keeps those of the report it was made
    with)."""
    if exp.bundle:
        return dict(exp.bundle.get("task_versions", {}))
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


def weights_of(source: str | None) -> str:
    """The weights a run used, in words, from run.json's ``model_source``: a GGUF file is named
    with its quantisation (``SmolLM2-135M-Instruct.Q4_1.gguf`` -> "the Instruct model's Q4_1
    GGUF ..., dequantised"), so a hub id served by the offline GGUF fallback cannot mislead."""
    if not source:
        return "not recorded"
    kind, _, path = source.partition(":")
    name = Path(path).name
    if kind == "gguf":
        quant = re.search(r"[.-]((?:I?Q\d\w*)|BF16|F16|F32)\.gguf$", name, re.IGNORECASE)
        model = "the Instruct model's" if "instruct" in name.lower() else "the model's"
        what = f"{model} {quant.group(1)} GGUF" if quant else f"{model} GGUF"
        return f"{what} (`{name}`), dequantised"
    if kind == "hub":
        return f"hub: `{path}`"
    if kind == "tiny":
        return f"`{source}` (random test model)"
    return f"{kind}: `{name}`" if path else kind


def _figure_sections(exp: Experiment, figs_dir: Path, analyse_model: bool) -> list[str]:
    """Task and training figures; with ``analyse_model``, where thinking helps and the thoughts
    with the highest reward (the longest-thought finished arm's final model, or its cache)."""
    sections: list[str] = []
    evals = "`eval/...` rows of `data/trials/*/metrics.jsonl`"
    tasks = not exp.evals.empty and bool(set(exp.evals["task"]) - {HELDOUT})
    final_title = (
        "Final task scores against thought tokens"
        if tasks
        else "Final held-out NLL without thinking against thought tokens"
    )
    figures = [
        (
            "accuracy_vs_step",
            "Task accuracy against training step (Figure 2 style)",
            fig_accuracy_vs_step(exp),
            f"{evals} (`eval/TASK/METRIC`)",
        ),
        (
            "final_vs_thought_tokens",
            final_title,
            fig_final_vs_thought_tokens(exp),
            f"the last {evals} of each trial (`eval/TASK/METRIC`)"
            if tasks
            else f"`eval/nll_base` in the last {evals} of each trial; mean and spread over seeds",
        ),
        (
            "training_curves",
            "Training curves",
            fig_training_curves(exp),
            "the training rows of `data/trials/*/metrics.jsonl`",
        ),
    ]
    thoughts, best = None, None
    if analyse_model:
        thoughts, best = _top_thoughts(exp, figures)
    for name, title, fig, where in figures:
        if fig is None:
            continue
        save(fig, figs_dir, name)
        sections += [f"## {title}", "", f"![{title}](figures/{name}.png)", "", source(where), ""]
    if thoughts is not None:
        sections += [
            "## Thoughts with the highest reward",
            "",
            "Held-out windows, sampled thoughts; reward = log-likelihood gain of the next tokens over "
            "the mean of the position's thoughts (nats).",
            "",
            _md_table(thoughts, ".3f"),
            "",
            source(f"`data/trials/{best}/analysis/top_thoughts.json.gz` (the final model)"),
            "",
        ]
    return sections


def _top_thoughts(exp: Experiment, figures: list) -> tuple[pd.DataFrame | None, str | None]:
    """The highest-reward thoughts of the longest-thought finished arm (appending its "where
    thinking helps" figure to ``figures``), and its trial id."""
    candidates = exp.trials[(~exp.trials.baseline) & (exp.trials.status == "done")]
    if candidates.empty:
        return None, None
    best = candidates.sort_values("thought_len").iloc[-1]
    run_dir = {t: d for t, d, _ in exp.trial_dirs}[best.trial_id]
    try:
        found = content.top_thoughts(run_dir)
    except (ValueError, OSError) as exc:  # e.g. a run whose data source is unreachable here
        exp.notes.append(f"model analyses skipped: {str(exc).splitlines()[0]}")
        warnings.warn(exp.notes[-1], stacklevel=2)
        return None, None
    if found is None:
        return None, None
    losses, thoughts = found
    figures.append(
        (
            "where_thinking_helps",
            f"Where thinking helps ({best.label}, held-out windows)",
            fig_where_thinking_helps(losses),
            f"per-token NLL of the final model in "
            f"`data/trials/{best.trial_id}/analysis/top_thoughts.json.gz`",
        )
    )
    return thoughts, best.trial_id


def _provenance_section(exp: Experiment) -> list[str]:
    """Code version, start time, model (the configured name and the weights used), data of every
    trial; task versions."""
    sections = ["## Provenance", ""]
    prov_rows = []
    for trial_id, prov in sorted(exp.provenance.items()):
        prov_rows.append(
            {
                "trial": trial_id,
                "git_sha": (prov.get("git_sha") or "-")[:12],
                "dirty": prov.get("git_dirty"),
                "started": prov.get("started"),
                "model (config)": prov.get("model"),
                "weights (model_source)": weights_of(prov.get("model_source")),
                "data": str(prov.get("data_source", ""))[-60:],
                "data origin": prov.get("data_origin"),  # local, hub or bundled (issue 12)
                "torch": prov.get("torch"),
                "transformers": prov.get("transformers"),
            }
        )
    prov_table = pd.DataFrame(prov_rows)
    if "data origin" in prov_table and prov_table["data origin"].isna().all():
        prov_table = prov_table.drop(columns="data origin")  # runs made before recording it
    sections += [_md_table(prov_table), "", source("`data/trials/*/run.json`"), ""]
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
    dirs = {t: d for t, d, _ in exp.trial_dirs}
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
    return [
        "## Failed trials",
        "",
        text,
        "",
        _md_table(pd.DataFrame(rows)),
        "",
        source("the last line of `data/trials/*/error.txt`"),
        "",
    ]
