"""A thought-viewer page (:mod:`qstar.analysis.viewer_page`) for the final model of each thinking
trial of a report, on its first held-out window: ``viewers/ID.html`` beside ``report.md``. The
viewer's data is computed once (it loads the model) and cached in the run directory
(``analysis/viewer.json``), which the data bundle keeps, so a report re-rendered from its bundle
writes the same pages without a model."""

from __future__ import annotations

import json
from pathlib import Path

from qstar.analysis import files
from qstar.analysis.experiment import Experiment
from qstar.analysis.report_tables import source
from qstar.analysis.viewer_page import render

CACHE = "analysis/viewer.json"


def viewer_data(run_dir: Path, analyse_model: bool) -> dict | None:
    """The cached viewer data of a trial, computed from its final model and first held-out
    window when absent and ``analyse_model``; ``None`` when neither is possible."""
    cached = files.find(run_dir / CACHE)
    if cached is not None:
        return json.loads(files.read_text(cached))
    final, windows = run_dir / "final", run_dir / "heldout.json"
    if not (analyse_model and final.is_dir() and windows.is_file()):
        return None
    from qstar.analysis import viewer  # loads the model: torch, heavy
    from qstar.core.model import QuietStar  # the same

    ids = json.loads(windows.read_text())["windows"]
    if not ids:
        return None
    qs = QuietStar.from_pretrained(final).eval()
    data = viewer.view_data(qs, ids[0], samples=3, source=f"{run_dir.name}: held-out window 0")
    # as read back, so the page made now and one made later from the cache (or the bundle) agree
    return json.loads(viewer.write_json(data, run_dir / CACHE).read_text(encoding="utf-8"))


def viewer_section(exp: Experiment, out: Path, analyse_model: bool) -> list[str]:
    """Write the pages; the report's list of them (``[]`` when there are none)."""
    links = []
    for trial_id, run_dir, _ in exp.trial_dirs:
        cfg = exp.configs.get(trial_id, {})
        if cfg.get("train", {}).get("objective") == "lm" or not run_dir.is_dir():
            continue
        if cfg.get("train", {}).get("method", "quiet_star") != "quiet_star":
            continue
        data = viewer_data(run_dir, analyse_model)
        if data is None:
            continue
        page = out / "viewers" / f"{trial_id}.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(render(data, title=f"{exp.name}: {trial_id}"), encoding="utf-8")
        links.append(f"- [{trial_id}](viewers/{trial_id}.html)")
    if not links:
        return []
    return [
        "## What the models think",
        "",
        "A thought viewer for the final model of each thinking trial, on its first held-out "
        "window (open in a browser; no server): each token coloured by the gain of thinking "
        "before it, a click for the thoughts, their rewards and the predictions.",
        "",
        *links,
        "",
        source("`data/trials/ID/analysis/viewer.json.gz` (computed once from `final/`)"),
        "",
    ]
