"""``train``: run (or resume) a training run of any registered method (``train.method``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qstar.recipes import base, registry
from qstar.recipes.base import OnEval
from qstar.run_config import RunConfig


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
    on_eval: OnEval | None = None,
) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary (on the main process).

    ``stop_after`` ends the work after that step (tests use it to simulate an interruption).
    ``on_eval(step, metrics, checkpoint)`` is called after every evaluation, once the step's
    checkpoint is written (sweeps report to Ray Tune through it). Under ``torchrun`` each
    process trains on its share of every batch (see :mod:`qstar.runs.distributed`)."""
    return base.run(registry.recipe_for(cfg), run_dir, resume, stop_after, on_eval)


def format_summary(cfg_or_method: RunConfig | str, summary: dict[str, Any]) -> str:
    """The one-screen summary ``qstar train`` prints, by the run's method."""
    name = cfg_or_method if isinstance(cfg_or_method, str) else cfg_or_method.train.method
    return registry.get(name).recipe.format_summary(summary)
