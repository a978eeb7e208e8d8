"""Every committed number regenerates from committed data: each report under reports/ re-renders
byte-identically from its data bundle, every relative link resolves, and the check notices an
edited number or a missing bundle. No model is loaded."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qstar.analysis import bench_info, bundle, content, dynamics, evidence, files, stats
from qstar.analysis.report import load_experiment, write_report
from qstar.analysis.report_sections import weights_of
from tests.test_evidence import _write_trial

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"
# the hand-built studies have a (fake) final model but no held-out windows: a skipped analysis
pytestmark = pytest.mark.filterwarnings("ignore:model analyses skipped")


# ---------------------------------------------------------------------------- committed reports
def test_every_committed_report_regenerates_from_its_bundle():
    """(a) Every report folder under reports/ (not archive/, bench/) has data/ and re-renders
    from it alone to its committed report.md; every figure it links is committed."""
    problems = []
    for report_dir in bundle.report_dirs(REPORTS):
        problems += bundle.check_report(report_dir)
    assert not problems, "\n".join(problems)


def test_every_relative_link_resolves():
    """(b) README.md and every Markdown file under reports/ link only to files that exist."""
    pages = [ROOT / "README.md", *sorted(REPORTS.rglob("*.md"))]
    problems = bundle.broken_links(pages)
    assert not problems, "\n".join(problems)


def test_links_are_found_outside_code_only():
    text = (
        "[a](x.md) ![fig](figures/f.png) [web](https://e.org) [anchor](#top) [sec](y.md#part)\n"
        "`[not](code.md)`\n```\n[nor](block.md)\n```\n"
    )
    assert bundle.linked_files(text) == ["x.md", "figures/f.png", "y.md"]


# ---------------------------------------------------------------------------- a hand-built study
def _experiment(root: Path, task_noise: float = 0.0) -> Path:
    """Two seeds of a 4-token arm and a no-thought baseline, with tasks and diagnostics."""
    qs_cfg = {"quiet_star": {"thought_len": 4, "n_true": 2}, "train": {"objective": "quiet_star"}}
    lm_cfg = {"quiet_star": {"thought_len": 4, "n_true": 2}, "train": {"objective": "lm"}}
    base0 = [[1.0, 2.0, 9.0], [3.0, 1.0]]
    trials = []
    for seed, shift in ((0, 0.1), (1, 0.3)):
        tid = f"t00{seed}-thought_len=4-seed={seed}"
        steps = {
            0: {"base": base0, "thought": base0},
            10: {
                "base": [[1.0, 2.0, 8.0], [3.0, 1.0]],
                "thought": [[1.0 - shift, 2.0, 7.0], [3.0, 1.0 + shift]],
            },
        }
        tasks = {(10, "csqa"): [1, 0, 1, 1], (10, "csqa:nothink"): [1 - task_noise, 0, 1, 1]}
        cfg = {**qs_cfg, "train": {"objective": "quiet_star", "seed": seed}}
        _write_trial(root, tid, steps, cfg, tasks)
        trials.append({"trial_id": tid, "overrides": [], "params": {"train.seed": seed}})
    _write_trial(root, "t002-objective=lm", {0: {"base": base0}, 10: {"base": base0}}, lm_cfg)
    trials.append({"trial_id": "t002-objective=lm", "overrides": [], "params": {}})
    for t in trials:
        run = root / "trials" / t["trial_id"]
        (run / "run.json").write_text(
            json.dumps(
                {
                    "git_sha": "0123456789abcdef",
                    "model": "HuggingFaceTB/SmolLM2-135M",
                    "model_source": "gguf:/cache/SmolLM2-135M-Instruct.Q4_1.gguf",
                }
            )
        )
        rows = [
            {"kind": "train", "step": s, "base_nll": 2.0 - 0.1 * s, "grad_norm/trunk": 1.0,
             "grad_norm": 3.0 + s, "grad_clip_coef": 0.5}
            for s in (1, 2)
        ]  # fmt: skip
        with (run / "metrics.jsonl").open("a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in rows))
        (run / "summary.json").write_text("{}")
        (run / "final").mkdir()  # a model that must never reach the bundle
        (run / "final" / "model.safetensors").write_bytes(b"weights")
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "optimizer.pt").write_bytes(b"state")
    (root / "trials.json").write_text(json.dumps({"trials": trials}))
    return root


@pytest.fixture
def study(tmp_path):
    """reports/study rendered from a hand-built experiment, with a reading."""
    exp = _experiment(tmp_path / "experiments" / "study")
    out = tmp_path / "reports" / "study"
    out.mkdir(parents=True)
    (out / "reading.md").write_text("A reading of the study.\n")
    write_report(exp, out, reading=out / "reading.md")
    return exp, out


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_bundle_holds_what_the_report_read_and_rerenders_identically(study, tmp_path):
    exp, out = study
    data = out / "data"
    names = set(_files(data))
    run = "trials/t000-thought_len=4-seed=0/"
    assert {"bundle.json", "trials.json", run + "config.yaml", run + "run.json"} <= names
    assert {run + "metrics.jsonl", run + "summary.json", run + "heldout/step_10.json.gz"} <= names
    assert run + "tasks/step_10/csqa:nothink.jsonl" in names
    assert not [n for n in names if "final" in n or "checkpoints" in n or n.endswith(".json.json")]
    step = json.loads(gzip.decompress((data / run / "heldout/step_10.json.gz").read_bytes()))
    assert step == json.loads((exp / run / "heldout/step_10.json").read_text())
    assert json.loads((data / "bundle.json").read_text())["name"] == "study"
    # from the bundle alone: the same report.md, figures and curves.csv, byte for byte
    again = write_report(data, tmp_path / "again", reading=out / "reading.md", bundle=False)
    assert again.read_text() == (out / "report.md").read_text()
    first = {k: v for k, v in _files(out).items() if not k.startswith(("data/", "reading"))}
    assert _files(tmp_path / "again") == first
    # rendered twice from the experiment: the same bytes (figures carry no dates or random ids)
    write_report(exp, out, reading=out / "reading.md")
    rendered = {k: v for k, v in _files(out).items() if not k.startswith("reading")}
    assert rendered == {**first, **{f"data/{k}": v for k, v in _files(data).items()}}
    assert bundle.check_reports(tmp_path / "reports") == []


def test_check_fails_on_an_edited_number_a_missing_figure_or_bundle(study, tmp_path):
    """(c) The check notices a number edited in a bundled file, a figure gone, a bundle gone."""
    _, out = study
    reports = tmp_path / "reports"
    held = out / "data/trials/t001-thought_len=4-seed=1/heldout/step_10.json.gz"
    original = held.read_bytes()
    step = json.loads(gzip.decompress(original))
    step["thought"][0][0] += 0.5
    files.write_gz(held, json.dumps(step).encode())
    problems = bundle.check_reports(reports)
    assert len(problems) == 1 and "report.md differs from its re-render" in problems[0]
    held.write_bytes(original)
    assert bundle.check_reports(reports) == []

    metrics = out / "data/trials/t002-objective=lm/metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text.replace('"eval/nll_base": 0.0', '"eval/nll_base": 0.25', 1))
    assert "differs" in " ".join(bundle.check_reports(reports))
    metrics.write_text(text)

    (out / "figures" / "training_curves.png").unlink()
    assert "links to missing figures/training_curves.png" in " ".join(bundle.check_reports(reports))
    bundle.render_reports(reports)  # make reports: re-rendered in place from the bundle
    assert bundle.check_reports(reports) == []

    files_before = _files(out / "data")
    shutil.rmtree(out / "data")
    (problem,) = bundle.check_reports(reports)
    assert "no data bundle" in problem and str(out) in problem
    assert files_before  # the bundle existed


def test_model_analyses_come_from_their_caches_in_the_bundle(tmp_path):
    """The content control and the top thoughts, cached beside a (fake) final model, are what the
    report shows, are copied into the bundle, and render from it without a model."""
    exp = _experiment(tmp_path / "exp")
    tokens = {
        "base": [[1.0, 2.0], [3.0]],
        "thought": [[0.5, 2.0], [2.5]],
        "fixed": [[1.0, 1.5], [3.0]],
    }
    top = {
        "losses": {"window": [0, 0, 1, 1] * 3, "position": list(range(12)),
                   "base_nll": [float(i) for i in range(12)], "thought_nll": [i - 0.1 for i in range(12)]},
        "thoughts": [{"reward": 0.25, "context": "2 + 2", "thought": " = 4", "next tokens": " so"}],
    }  # fmt: skip
    for tid in ("t000-thought_len=4-seed=0", "t001-thought_len=4-seed=1"):
        run = exp / "trials" / tid
        key = content._final_key(run)
        (run / "analysis").mkdir()
        (run / "analysis/content_control.json").write_text(
            json.dumps({"key": key, "tokens": tokens})
        )
        (run / "analysis/top_thoughts.json").write_text(json.dumps({"key": key, **top}))
    text = write_report(exp, tmp_path / "out").read_text()
    assert "### Does the content of the thought matter?" in text and "| 0.250 | 2 + 2 |" in text
    assert "## Where thinking helps (4 thought tokens, n_true 2, seed 1" in text
    data = tmp_path / "out" / "data"
    assert (data / "trials/t001-thought_len=4-seed=1/analysis/top_thoughts.json.gz").is_file()
    again = write_report(data, tmp_path / "again", bundle=False).read_text()
    assert again == text
    # a failure of the model analysis is a note, reproduced from the bundle as well
    for run in (exp / "trials").iterdir():
        if (run / "analysis").is_dir():
            key = content._final_key(run)
            (run / "analysis/top_thoughts.json").write_text(
                json.dumps({"key": key, "error": "boom"})
            )
            (run / "final" / "model.safetensors").unlink()  # so the cached error is used here
    with pytest.warns(UserWarning, match="model analyses skipped: boom"):
        text = write_report(exp, tmp_path / "out2").read_text()
    assert "model analyses skipped: boom" in text
    with pytest.warns(UserWarning):
        assert (
            write_report(tmp_path / "out2" / "data", tmp_path / "again2", bundle=False).read_text()
            == text
        )


def test_a_single_run_bundles_as_a_one_trial_study(tmp_path):
    exp = _experiment(tmp_path / "exp")
    run = exp / "trials" / "t000-thought_len=4-seed=0"
    text = write_report(run, tmp_path / "out").read_text()
    assert text.startswith("# qstar report: t000-thought_len=4-seed=0\n")
    spec = json.loads((tmp_path / "out/data/trials.json").read_text())
    assert [t["trial_id"] for t in spec["trials"]] == ["t000-thought_len=4-seed=0"]
    assert write_report(tmp_path / "out/data", tmp_path / "again", bundle=False).read_text() == text


def test_readers_take_json_or_gzipped_json(tmp_path):
    (tmp_path / "heldout").mkdir()
    (tmp_path / "heldout/step_2.json").write_text('{"base": [[1.0]]}')
    files.write_gz(tmp_path / "heldout/step_10.json.gz", b'{"base": [[2.0]]}')
    assert [p.name for p in files.matching(tmp_path / "heldout", "step_*.json")] == [
        "step_2.json",
        "step_10.json",
    ]
    tokens = evidence.load_tokens(tmp_path)
    assert list(tokens) == [2, 10] and tokens[10].base[0][0] == 2.0
    first = (tmp_path / "heldout/step_10.json.gz").read_bytes()
    files.write_gz(tmp_path / "heldout/step_10.json.gz", b'{"base": [[2.0]]}')
    assert (tmp_path / "heldout/step_10.json.gz").read_bytes() == first  # no timestamp inside


def test_float32_numbers_are_stored_short_and_read_back_exactly(tmp_path):
    """Per-token NLL is float32: the bundle writes each number in its shortest float32 form,
    and the reader restores the very same float64 values (so the report is the same)."""
    values = np.random.default_rng(0).gamma(1.5, 1.6, size=(8, 63)).astype(np.float32)
    doc = {"base": [w.tolist() for w in values], "thought": [(w * 0.9).tolist() for w in values]}
    run, copy = tmp_path / "run", tmp_path / "copy"
    (run / "heldout").mkdir(parents=True)
    (run / "heldout/step_5.json").write_text(json.dumps(doc))
    files.write_bundle(run, [("r", run, {})], copy, {"name": "r"}, model_caches=False)
    packed = copy / "trials/r/heldout/step_5.json.gz"
    short = json.loads(gzip.decompress(packed.read_bytes()))
    assert short["dtype"] == "float32"
    assert len(gzip.decompress(packed.read_bytes())) < 0.65 * len(json.dumps(doc))
    a, b = evidence.load_tokens(run)[5], evidence.load_tokens(copy / "trials/r")[5]
    assert all(
        np.array_equal(x, y) for x, y in zip(a.base + a.thought, b.base + b.thought, strict=True)
    )
    # numbers that are not float32 (or not finite) are left exactly as they were
    assert files.compact_floats(b'{"base": [[0.1, 2.5]]}') == b'{"base": [[0.1, 2.5]]}'


def test_bundle_refuses_to_replace_a_folder_that_is_not_one(tmp_path):
    exp = _experiment(tmp_path / "exp")
    (tmp_path / "out" / "data").mkdir(parents=True)
    (tmp_path / "out" / "data" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a data bundle"):
        write_report(exp, tmp_path / "out")
    assert (tmp_path / "out" / "data" / "mine.txt").is_file()


# ---------------------------------------------------------------------------- rendering fixes
def test_labels_name_the_seed_when_trials_differ_by_seed(tmp_path):
    exp = load_experiment(_experiment(tmp_path / "exp"))
    assert list(exp.trials.label) == [
        "4 thought tokens, n_true 2, seed 0",
        "4 thought tokens, n_true 2, seed 1",
        "no thought (baseline)",
    ]
    arms = evidence.arms_of(exp, {t: tmp_path / "exp/trials" / t for t in exp.trials.trial_id})
    assert [a.label for a in arms] == ["4 thought tokens, n_true 2", "no thought (baseline)"]


def test_a_difference_whose_interval_includes_zero_is_not_a_finding():
    tasks = [
        ("noise", stats.Estimate(2e-17, 1e-17, 3e-17, 100)),  # float error around 0
        ("zero", stats.Estimate(0.0, 0.0, 0.0, 100)),
        ("wide", stats.Estimate(0.01, -0.02, 0.04, 100)),
        ("small", stats.Estimate(0.0004, 0.0001, 0.0007, 100)),
    ]
    frame = pd.DataFrame(
        [{"arm": a, "task": "csqa", "metric": "acc", "thinking - not": e} for a, e in tasks]
    )
    lines = evidence.findings(pd.DataFrame(), frame)
    assert all("no difference resolved" in line for line in lines[:3])
    assert lines[3] == (
        "small, csqa acc: thinking minus not +0.040 [+0.010, +0.070] points (thinking helps)."
    )
    assert "+1.0 [-2.0, +4.0]" in lines[2]


def test_the_diagnostics_legend_names_exactly_the_columns_shown(tmp_path):
    exp = load_experiment(_experiment(tmp_path / "exp"))
    diag = dynamics.diagnostics_table(exp, {})
    legend = dynamics.diagnostics_legend(list(diag.columns))
    named = re.findall(r"`([^`]+)`:", legend)
    shown = [c for c in diag.columns if c != "trial" and not c.startswith("NLL@")]
    assert named == [*shown, "NLL@step"]
    assert "policy/NLL" not in legend and "update" not in legend


def test_every_table_and_figure_states_its_source(study):
    _, out = study
    text = (out / "report.md").read_text()
    chunks = re.split(r"\n(?=#+ )", text)
    for chunk in chunks:
        if "|---" in chunk or "![" in chunk:
            assert "\nSource: " in chunk, chunk[:200]
    assert "## Final held-out NLL without thinking against thought tokens" in text
    assert "Final accuracy" not in text


def test_provenance_names_the_weights_used():
    gguf = "gguf:/root/.cache/qstar/models/x/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert weights_of(gguf) == (
        "the Instruct model's Q4_1 GGUF (`SmolLM2-135M-Instruct.Q4_1.gguf`), dequantised"
    )
    assert weights_of("hub:HuggingFaceTB/SmolLM2-135M") == "hub: `HuggingFaceTB/SmolLM2-135M`"
    assert weights_of(None) == "not recorded"
    assert "random" in weights_of("tiny:llama")


def test_estimates_print_enough_digits():
    assert stats.Estimate(0.0004, 0.0001, 0.0007, 9).digits(scale=100) == 3
    assert stats.Estimate(0.25, 0.1, 0.4, 9).digits(scale=100) == 1
    assert stats.Estimate(0.0, 0.0, 0.0, 9).digits() == 1
    assert not stats.Estimate(1e-18, 1e-18, 2e-18, 9).excludes_zero()
    assert np.isfinite(stats.Estimate(0.1, 0.0, 0.2, 9).digits())


# ---------------------------------------------------------------------------- benchmarks
def test_benchmark_files_record_the_commit_and_the_command(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/venv/bin/qstar", "bench", "--out", "reports/my bench"])
    info = bench_info.run_info()
    assert info["command"] == "qstar bench --out 'reports/my bench'"
    assert set(info) == {"git_sha", "git_dirty", "command"}
    lines = bench_info.header("Train-step benchmark", {**info, "torch": "2.x"})
    assert lines[0] == "# Train-step benchmark"
    assert "Command: `qstar bench --out 'reports/my bench'`" in lines
    assert any(line.startswith("Code: qstar git ") for line in lines)
    assert 'Environment: {"torch": "2.x"}' in lines
