"""The training methods other than Quiet-STaR, by their ``train.method`` name: the recipe that
runs one (``(cfg, run_dir, resume, stop_after, on_eval) -> summary``) and the one-screen summary
``qstar train`` prints. A new method on question-answer data adds its entry here."""

from __future__ import annotations

from qstar.recipes import star, trice, vstar

RECIPES = {"star": star.train_star, "trice": trice.train_trice, "vstar": vstar.train_vstar}
SUMMARIES = {
    "star": star.format_summary,
    "trice": trice.format_summary,
    "vstar": vstar.format_summary,
}
