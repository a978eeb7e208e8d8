"""Experiments as tidy DataFrames, the paper's figures, and ``qstar report``.

An experiment directory is what ``qstar sweep`` writes (``trials.json``, ``trials/ID/``) or a
single ``qstar train`` run directory (one trial). Tables:

* ``steps``:  one row per (trial, step) of training metrics, the trial's resolved config joined
  in as ``cfg.SECTION.KEY`` columns and its varying parameters as plain columns;
* ``evals``:  one row per (trial, step, task, metric, value) -- held-out NLL rows have task
  ``heldout``; lm-eval rows come from ``eval/TASK/METRIC``;
* ``trials``: one row per trial: status, parameters, thought length, label.

Beside ``report.md`` and ``figures/``, ``write_report`` writes ``data/``: the data bundle, the
compact copy of every file the report read (:mod:`qstar.analysis.files`), from which the same
report renders again without the experiment folder or a model (:mod:`qstar.analysis.bundle`).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from qstar.analysis import files
from qstar.analysis.content import token_losses_and_thoughts  # noqa: F401  (re-exported)
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
from qstar.analysis.plotting import save  # noqa: F401
from qstar.analysis.report_evidence import (  # noqa: F401  (the sections, re-exported)
    _content_section,
    _curve_sections,
    _dynamics_sections,
    _evidence_sections,
    _heldout_section,
    _task_section,
)
from qstar.analysis.report_sections import (  # noqa: F401
    _failed_section,
    _figure_sections,
    _methods_section,
    _provenance_section,
    _short_source,
    _task_versions,
)
from qstar.analysis.report_tables import (  # noqa: F401  (the tables, re-exported)
    _INT_COLUMNS,
    _md_table,
    method_table,
    results_table,
    source,
)
from qstar.analysis.report_viewer import viewer_section


def write_report(
    exp_dir: str | Path,
    out: str | Path,
    analyse_model: bool = True,
    reading: str | Path | None = None,
    bundle: bool = True,
    with_: list[str | Path] = (),
    with_trials: list[str] = (),
) -> Path:
    """Write ``report.md``, figures and (with ``bundle``) the data bundle ``out/data/`` for an
    experiment; deterministic for the same inputs.

    ``exp_dir``: an experiment, a run directory, or a data bundle (``DIR/data``): a report
    rendered from its bundle is byte-identical to the one rendered from the experiment, and
    loads no model (the model analyses come from the bundle's caches). ``reading``: a Markdown
    file with a written interpretation, placed under "Reading" (an input like the runs, so the
    report stays generated). ``with_`` / ``with_trials``: finished trials of other experiments
    or bundles to report beside this one's (:func:`load_experiment`); the bundle keeps them."""
    if with_ and files.is_bundle(exp_dir):
        raise ValueError(f"{exp_dir} is a report's bundle: it holds its --with trials already")
    exp = load_experiment(exp_dir, with_, with_trials)
    out = Path(out)
    if exp.bundle:
        analyse_model = analyse_model and exp.bundle.get("analyse_model", True)
    data = out / "data"
    if bundle and data.exists() and not files.is_bundle(data):
        raise ValueError(f"{data} exists and is not a data bundle; remove it or choose --out")
    figs_dir = out / "figures"
    stale_pages = [*(out / "viewers").glob("*.html")]
    for stale in [
        *figs_dir.glob("*.png"),
        *figs_dir.glob("*.svg"),
        out / "curves.csv",
        *stale_pages,
    ]:
        stale.unlink(missing_ok=True)  # what this render draws, and nothing older
    sections = [f"# qstar report: {exp.name}", ""]
    for note in exp.notes:
        warnings.warn(note, stacklevel=2)
    sections += _failed_section(exp)
    if reading is not None:
        sections += ["## Reading", "", Path(reading).read_text().strip(), ""]
    evidence_sections = _evidence_sections(exp, figs_dir, analyse_model)
    sections += ["## Results", "", _md_table(results_table(exp)), ""]
    sections += [
        source(
            "the last `eval/...` row and the last training step in "
            "`data/trials/*/metrics.jsonl`; status from the files in each trial's folder"
        ),
        "",
    ]
    sections += _references(exp)
    sections += _methods_section(exp, figs_dir)
    sections += evidence_sections
    sections += _figure_sections(exp, figs_dir, analyse_model)
    sections += viewer_section(exp, out, analyse_model)
    sections += _provenance_section(exp)
    sections += [
        "Configs: each trial's resolved config is `data/trials/ID/config.yaml`; the sweep's "
        "varying parameters (`data/trials.json`):",
        "",
        _md_table(exp.trials.drop(columns=["label"], errors="ignore")),
        "",
    ]
    if exp.notes:
        sections += ["Notes: " + "; ".join(exp.notes), ""]
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.md"
    report.write_text("\n".join(sections))
    if bundle:
        _write_bundle(exp, data, analyse_model)
    return report


def _write_bundle(exp: Experiment, data: Path, analyse_model: bool) -> None:
    """The experiment's data bundle at ``data`` (a bundle rendered in place is left as it is;
    one rendered elsewhere is copied)."""
    if exp.bundle:
        if data.resolve() != exp.path.resolve():
            shutil.rmtree(data, ignore_errors=True)
            shutil.copytree(exp.path, data)
        return
    meta = {"name": exp.name, "analyse_model": analyse_model, "task_versions": _task_versions(exp)}
    spec = None
    if exp.references:
        meta["with"] = exp.references
        spec = _trials_spec(exp.path)
        for ref in exp.references:
            entries = {t["trial_id"]: t for t in _trials_spec(Path(ref["path"]))["trials"]}
            spec["trials"] += [{**entries[t], "from": ref["name"]} for t in ref["trials"]]
    # the caches that exist go in even under --no-model: a cached analysis is shown either way
    files.write_bundle(exp.path, exp.trial_dirs, data, meta, True, trials_spec=spec)


def _trials_spec(path: Path) -> dict:
    """``trials.json`` of an experiment or bundle; a run directory as a one-trial sweep."""
    if files.exists(path / "trials.json"):
        return files.read_json(path / "trials.json")
    return files.one_run_spec(_trial_dirs(path))


def _references(exp: Experiment) -> list[str]:
    """Which trials were read from other experiments (``--with``), and from where."""
    if not exp.references:
        return []
    lines = [
        f"- from `{r['name']}` (`{r['path']}`): " + ", ".join(f"`{t}`" for t in r["trials"])
        for r in exp.references
    ]
    return [
        "Trials read from other experiments (`qstar report --with`), trained there on the same "
        "held-out windows and not again here:",
        "",
        *lines,
        "",
    ]
