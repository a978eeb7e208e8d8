"""The recipe contract: what a training method writes, and the one loop that runs every method.

A recipe subclasses :class:`Recipe` and fills in its hooks; :func:`run` does the rest, the same
for every method: the run directory, seeding, the model and what trains, several processes, the
optimiser, checkpoints (atomic, with the recipe's own state), resume (equal to an uninterrupted
run), evaluation cadence, metrics, ``final/`` and ``summary.json``. A method is registered once
in :mod:`qstar.recipes.registry`.

The loop::

    open the run (qstar.runs.session.open_run, calling recipe.prepare for the data)
    restore recipe.load_state_dict(checkpoint) | or, new: recipe.begin, evaluate(0)
    for step in start+1 .. recipe.total_steps():
        recipe.train_step(run, step)                       # logs its own rows
        row = recipe.evaluate(run, step) if recipe.eval_due(step)
        checkpoint with recipe.state_dict() when due
        on_eval(...)
    recipe.summary(run) -> final/ + summary.json -> recipe.after(summary)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from tqdm.auto import tqdm

from qstar.core.model import QuietStar
from qstar.run_config import RunConfig
from qstar.runs import distributed, session
from qstar.runs.state import Run
from qstar.runs.trainable import check_trainable

OnEval = Callable[[int, dict[str, Any], Path | None], None]


class Recipe:
    """One training method. ``cfg`` is the whole run config; the recipe reads its own section.

    Class attributes: ``thinks`` (the objective uses thoughts: ``train.trainable=heads`` and
    gradient splitting need it), ``find_unused`` (some trainable parameters get no gradient:
    data-parallel wrappers must know).
    """

    thinks: ClassVar[bool] = False
    find_unused: ClassVar[bool] = True

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    # ---------------------------------------------------------------- hooks
    def check(self) -> None:
        """Bad combinations of settings: raise ``ValueError`` (one line) before any work."""

    def prepare(self, qs: QuietStar, ctx: distributed.Context) -> dict[str, Any]:
        """Load the data (the model's tokenizer is ready); return what ``run.json`` records of
        it. Runs on every process before anything is written, so a bad source leaves no
        trace."""
        return {}

    def total_steps(self) -> int:
        """How many steps the run has (a step is the unit of checkpoints and resume)."""
        return self.cfg.train.steps

    def begin(self, run: Run) -> None:
        """A new run's work before step 1 and the evaluation at step 0."""

    def train_step(self, run: Run, step: int) -> dict[str, Any]:
        """One step; logs its rows through ``run.log``; returns the last of them (the loop hands
        it to ``on_eval`` with the evaluation)."""
        raise NotImplementedError

    def eval_due(self, step: int) -> bool:
        every = self.cfg.eval.every
        return bool(every and step % every == 0) or step == self.total_steps()

    def checkpoint_due(self, step: int) -> bool:
        every = self.cfg.train.checkpoint_every
        return bool(every and step % every == 0)

    def evaluate(self, run: Run, step: int) -> dict[str, Any] | None:
        """The evaluation row at ``step`` (``kind: "eval"``), logged by the loop, or ``None``.
        Called on every process; the result must be the same on all of them."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What the recipe needs to resume (JSON): data position, iteration, memory..."""
        return {}

    def tensor_state(self) -> dict[str, Any]:
        """The recipe's own tensors to checkpoint (``recipe.safetensors``), if any."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` from a checkpoint (after :meth:`prepare`); the tensors
        of :meth:`tensor_state` come back under ``state["tensors"]``."""

    def summary(self, run: Run) -> dict[str, Any]:
        """The recipe's figures for ``summary.json`` (the final model is written after this)."""
        return {}

    def after(
        self, run_dir: Path, summary: dict[str, Any], ctx: distributed.Context
    ) -> dict[str, Any]:
        """Work after ``final/`` is written and the process group is gone (e.g. scoring a
        sharded run's tasks on the gathered model); returns the summary."""
        return summary

    @staticmethod
    def format_summary(summary: dict[str, Any]) -> str:
        """The one-screen summary ``qstar train`` prints."""
        return "\n".join(f"{k:15} {v}" for k, v in summary.items())

    def progress_postfix(self, row: dict[str, Any]) -> dict[str, str]:
        return {}

    @staticmethod
    def report_figures(summary: dict[str, Any]) -> dict[str, Any]:
        """The method's own columns in a report's comparison of methods, from its summary."""
        return {}


def run(
    recipe: Recipe,
    run_dir: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
    on_eval: OnEval | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``recipe``; returns the summary (on the main process; ``{}`` on the
    others). ``stop_after`` ends the work after that step (tests simulate an interruption
    with it): returns ``{"stopped_at": step, "run_dir": ...}``. ``on_eval(step, metrics,
    checkpoint)`` is called after every evaluation once the step's checkpoint is written
    (sweeps report to Ray Tune through it)."""
    recipe.check()
    check_trainable(recipe.cfg.train.trainable, recipe.thinks)
    run_dir = Path(run_dir)
    cfg = recipe.cfg
    ctx = distributed.init()
    try:
        r = session.open_run(
            cfg, run_dir, resume, ctx, recipe.prepare, recipe.thinks, recipe.find_unused
        )
        if r.resumed_state is not None:
            recipe.load_state_dict(r.resumed_state)
        try:
            stopped = _loop(recipe, r, stop_after, on_eval)
        finally:
            session.close(r)
        if stopped is not None:
            return {"stopped_at": stopped, "run_dir": str(run_dir)}
        summary = session.finish(r, recipe.summary(r))
    finally:
        distributed.shutdown(ctx)
    return recipe.after(run_dir, summary, ctx)


def _loop(recipe: Recipe, r: Run, stop_after: int | None, on_eval: OnEval | None) -> int | None:
    total = recipe.total_steps()
    if r.start == 0:
        recipe.begin(r)
        first = recipe.evaluate(r, 0)
        if first is not None:
            r.log(first)
            if on_eval is not None:
                on_eval(int(first.get("step", 0)), first, None)
    bar = None
    if r.ctx.main and r.cfg.logging.progress:
        bar = tqdm(total=total, initial=r.start, desc="train", unit="step", dynamic_ncols=True)
    try:
        for step in range(r.start + 1, total + 1):
            row = recipe.train_step(r, step)
            evaluation = recipe.evaluate(r, step) if recipe.eval_due(step) else None
            if evaluation is not None:
                r.log(evaluation)
            due = (
                recipe.checkpoint_due(step)
                or step == total
                or step == stop_after
                or (on_eval is not None and evaluation is not None)
            )
            saved = (
                session.save(r, step, recipe.state_dict(), recipe.tensor_state()) if due else None
            )
            if evaluation is not None and on_eval is not None:
                on_eval(int(evaluation.get("step", step)), {**row, **evaluation}, saved)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(recipe.progress_postfix(row))
            if stop_after is not None and step >= stop_after:
                return step
    finally:
        if bar is not None:
            bar.close()
    return None
