"""``qstar report EXP --with OTHER``: trials trained by another experiment (a baseline, an arm of
the headline) are reported beside this one's as if they were its own, the bundle keeps them, and
trials evaluated on other held-out windows are refused. No model is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from qstar.analysis.report import load_experiment, write_report
from tests.test_reports import _experiment

pytestmark = pytest.mark.filterwarnings("ignore:model analyses skipped")
BASELINE = "t002-objective=lm"


def _split(root: Path) -> tuple[Path, Path, Path]:
    """The hand-built study whole, and the same split in two experiments: the thinking arm's
    seeds in one, the no-thought baseline in the other."""
    whole = _experiment(root / "whole")
    cfg = whole / "trials" / BASELINE / "config.yaml"
    cfg.write_text(
        yaml.safe_dump({**yaml.safe_load(cfg.read_text()), "train": {"objective": "lm", "seed": 0}})
    )
    spec = json.loads((whole / "trials.json").read_text())
    thinking, base = root / "thinking", root / "base"
    for exp, keep in ((thinking, lambda t: t != BASELINE), (base, lambda t: t == BASELINE)):
        trials = [t for t in spec["trials"] if keep(t["trial_id"])]
        for t in trials:
            shutil.copytree(whole / "trials" / t["trial_id"], exp / "trials" / t["trial_id"])
        (exp / "trials.json").write_text(json.dumps({"trials": trials}))
    return whole, thinking, base


def _section(report: Path, title: str) -> str:
    text = report.read_text()
    start = text.index(title)
    return text[start : text.index("\n#", start + 1)]


def test_trials_read_with_another_experiment_report_as_if_trained_here(tmp_path):
    whole, thinking, base = _split(tmp_path)
    alone = write_report(whole, tmp_path / "r_whole")
    joined = write_report(thinking, tmp_path / "r_joined", with_=[base])
    # the comparison with the baseline is the same number either way
    table = "### Held-out text at the last step"
    assert _section(joined, table) == _section(alone, table)
    assert "vs baseline" in _section(joined, table) and "+0.2000" in _section(joined, table)
    assert f"- from `base` (`{base}`): `{BASELINE}`" in joined.read_text()
    # the bundle holds every trial, says where each came from and re-renders byte for byte
    data = tmp_path / "r_joined" / "data"
    spec = json.loads((data / "trials.json").read_text())
    assert [t.get("from") for t in spec["trials"]] == [None, None, "base"]
    assert (data / "trials" / BASELINE / "heldout" / "step_10.json.gz").is_file()
    assert json.loads((data / "bundle.json").read_text())["with"][0]["trials"] == [BASELINE]
    shutil.rmtree(base)  # the other experiment is not needed any more
    again = write_report(data, tmp_path / "again", bundle=False)
    assert again.read_text() == joined.read_text()
    with pytest.raises(ValueError, match="holds its --with trials already"):
        write_report(data, tmp_path / "again", with_=[thinking])


def test_only_the_chosen_trials_are_read_and_ids_must_not_clash(tmp_path):
    whole, thinking, base = _split(tmp_path)
    exp = load_experiment(thinking, with_=[whole], with_trials=["t002-*"])
    assert list(exp.trials.trial_id) == [
        *sorted(p.name for p in (thinking / "trials").iterdir()),
        BASELINE,
    ]
    with pytest.raises(ValueError, match="no trial matches --with-trials zz"):
        load_experiment(thinking, with_=[whole], with_trials=["zz*"])
    with pytest.raises(ValueError, match="t000-thought_len=4-seed=0 has the id of another trial"):
        load_experiment(thinking, with_=[whole])


def test_trials_on_other_held_out_windows_are_refused(tmp_path):
    _, thinking, base = _split(tmp_path)
    for run in [*(thinking / "trials").iterdir(), base / "trials" / BASELINE]:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        window = 128 if run.parent.parent == base else 64
        cfg["data"] = {"val_source": "openai/gsm8k", "window": window}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"other held-out windows \(data.window 128 vs 64\)"):
        load_experiment(thinking, with_=[base])
