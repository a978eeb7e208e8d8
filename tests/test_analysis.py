"""Experiment loading, figures, reports (reproducible) and the notebooks, on a fixture experiment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qstar.analysis import report as analysis

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A sweep-shaped experiment of three tiny trials (two thought lengths and the baseline)."""
    from qstar.cli import resolve_config
    from qstar.recipes.train import train
    from qstar.run_config import load_run_config

    exp = tmp_path_factory.mktemp("exp") / "fixture"
    trials = [
        ("t000-thought_len=2", ["quiet_star.thought_len=2"], {"quiet_star.thought_len": 2}),
        ("t001-thought_len=3", ["quiet_star.thought_len=3"], {"quiet_star.thought_len": 3}),
        ("t002-objective=lm", ["train.objective=lm"], {"train.objective": "lm"}),
    ]
    for trial_id, overrides, _ in trials:
        cfg = load_run_config(
            resolve_config("debug_tiny"),
            ["logging.progress=false", "train.steps=4", "eval.every=2", *overrides],
        )
        run = exp / "trials" / trial_id
        train(cfg, run)
        # add task metrics as lm-eval would log them (a fixture: no task run needed)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for r in rows:
            if r["kind"] == "eval":
                r["eval/qstar_csqa_paper/acc"] = 0.2 + 0.01 * r["step"] + 0.05 * len(overrides[0])
                r["eval/qstar_csqa_paper/soft_score"] = 0.1 + 0.01 * r["step"]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (exp / "trials.json").write_text(
        json.dumps({"trials": [{"trial_id": t, "overrides": o, "params": p} for t, o, p in trials]})
    )
    return exp


def test_tidy_tables(experiment):
    exp = analysis.load_experiment(experiment)
    assert list(exp.trials.thought_len) == [2, 3, 0] and list(exp.trials.baseline) == [
        False,
        False,
        True,
    ]
    assert set(exp.trials.status) == {"done"}
    assert len(exp.steps) == 3 * 4 and {"cfg.quiet_star.thought_len", "base_nll"} <= set(
        exp.steps.columns
    )
    csqa = exp.evals[exp.evals.task == "qstar_csqa_paper"]
    assert set(csqa.metric) == {"acc", "soft_score"} and sorted(csqa.step.unique()) == [0, 2, 4]
    held = exp.evals[exp.evals.task == analysis.HELDOUT]
    assert {"nll_base", "nll_thought"} <= set(held.metric)
    one_run = analysis.load_experiment(experiment / "trials" / "t000-thought_len=2")
    assert len(one_run.trials) == 1 and len(one_run.steps) == 4


def test_malformed_rows_name_file_and_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"kind": "train", "step": 1, "base_nll": 2.0}\n{oops}\n{"kind": "train", "step": 2}\n'
    )
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: malformed metrics row"):
        analysis.load_experiment(run)
    (run / "metrics.jsonl").write_text(
        '{"kind": "train", "step": 1, "base_nll": 2.0}\n{"kind": "tr'
    )
    exp = analysis.load_experiment(run)  # a killed run's partial last line is allowed, and reported
    assert len(exp.steps) == 1 and "partial last line" in exp.notes[0]


def test_report_is_complete_and_reproducible(experiment, tmp_path):
    out = tmp_path / "report"
    report = analysis.write_report(experiment, out)
    text = report.read_text()
    for name in (
        "accuracy_vs_step",
        "final_vs_thought_tokens",
        "training_curves",
        "where_thinking_helps",
    ):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000 and (
            out / "figures" / f"{name}.svg"
        ).exists()
        assert f"figures/{name}.png" in text
    assert "Thoughts with the highest reward" in text and "no thought (baseline)" in text
    assert "## Provenance" in text and "git_sha" in text
    first = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    analysis.write_report(experiment, out)
    again = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert first == again
    # the data bundle: no weights, the model analyses cached; rendered from it alone (no model
    # loaded), the same report.md and figures, byte for byte
    bundled = [k for k in first if k.startswith("data/")]
    assert not [k for k in bundled if "/final/" in k or "/checkpoints/" in k or "/tb/" in k]
    assert any(k.endswith("analysis/top_thoughts.json.gz") for k in bundled)
    assert any(k.endswith("analysis/content_control.json.gz") for k in bundled)
    analysis.write_report(out / "data", tmp_path / "again", bundle=False)
    rerendered = {
        str(p.relative_to(tmp_path / "again")): p.read_bytes()
        for p in sorted((tmp_path / "again").rglob("*"))
        if p.is_file()
    }
    assert rerendered == {k: v for k, v in first.items() if not k.startswith("data/")}


@pytest.mark.parametrize("notebook", ["overview.ipynb", "compare.ipynb"])
def test_notebooks_execute_headless(experiment, notebook, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for var in ("QSTAR_EXPERIMENT", "QSTAR_EXPERIMENT_A", "QSTAR_EXPERIMENT_B"):
        monkeypatch.setenv(var, str(experiment))
    nb = nbformat.read(ROOT / "analysis" / notebook, as_version=4)
    nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "analysis")}},
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert outputs
