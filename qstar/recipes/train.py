"""The Quiet-STaR training recipe (and the no-thought baseline, ``train.objective=lm``):
setup -> (train step -> evaluate -> checkpoint) x steps -> finish, over the shared pieces of
:mod:`qstar.recipes.common` (run directory layout there)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qstar.core.model import QuietStar
from qstar.errors import TrainingDiverged
from qstar.evaluation.heldout import heldout_nll, task_metrics
from qstar.recipes import checkpoint, diagnostics, distributed
from qstar.recipes.common import (
    Run,
    autocast_for,
    cleanup,
    finish,
    nonfinite_part,
    peak_memory_mb,
    pick_device,
    save_checkpoint,
    setup,
    tasks_due,
)
from qstar.recipes.rundir import write_json
from qstar.recipes.tracking import MetricsLogger
from qstar.run_config import RunConfig


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
    on_eval: Callable[[int, dict[str, Any], Path | None], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary (on the main process).

    ``stop_after`` ends the work after that step (tests use it to simulate an interruption).
    ``on_eval(step, metrics, checkpoint)`` is called after every evaluation, once the step's
    checkpoint is written (sweeps report to Ray Tune through it). Under ``torchrun`` each
    process trains on its share of every batch (see :mod:`qstar.distributed`).
    ``train.method`` ``star``, ``trice`` or ``vstar`` runs that recipe instead (:mod:`qstar.recipes.methods`)."""
    if cfg.train.method != "quiet_star":
        from qstar.recipes import methods

        return methods.RECIPES[cfg.train.method](cfg, run_dir, resume, stop_after, on_eval)
    ctx = distributed.init()
    try:
        summary = _train(cfg, Path(run_dir), resume, stop_after, on_eval, ctx)
    finally:
        distributed.shutdown(ctx)
    if (
        summary.get("final_model")
        and cfg.eval.tasks
        and distributed.sharded(ctx, cfg.train.parallel)
    ):
        summary = final_task_eval(cfg, Path(run_dir), summary, ctx)
    return summary


def final_task_eval(
    cfg: RunConfig, run_dir: Path, summary: dict[str, Any], ctx: distributed.Context
) -> dict[str, Any]:
    """``eval.tasks`` of a sharded run: no process holds the whole model while training, so the
    main process scores the tasks on the gathered ``final/`` model once training is over (the
    other processes have left). Logged as an evaluation row at the last step."""
    think = cfg.train.objective == "quiet_star"
    device = distributed.device_for(ctx, pick_device(cfg.train.device))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    qs = QuietStar.from_pretrained(summary["final_model"], dtype=dtype).to(device)
    autocast = autocast_for(cfg, device)
    step = cfg.train.steps
    samples = run_dir / "tasks" / f"step_{step}"
    with autocast:
        row = task_metrics(qs, cfg, think, samples)
        if think and cfg.eval.tasks_both:
            row.update(task_metrics(qs, cfg, False, samples))
    logger = MetricsLogger(run_dir, cfg.logging.tensorboard, False)
    try:
        logger.log({"kind": "eval", "step": step, **row})
    finally:
        logger.close()
    summary["eval_last"] = {**(summary.get("eval_last") or {}), **row}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _train(
    cfg, run_dir: Path, resume, stop_after, on_eval, ctx: distributed.Context
) -> dict[str, Any]:
    run = setup(cfg, run_dir, resume, ctx)
    step_state = StepState(cfg, run)
    if run.start == 0:
        run.first_eval = run.last_eval = evaluate(run, 0)
        if run.first_eval is not None and on_eval is not None:
            on_eval(0, {"kind": "eval", "step": 0, **run.first_eval}, None)
    progress = _progress(cfg, run.start) if ctx.main else None
    try:
        for step in range(run.start + 1, cfg.train.steps + 1):
            row = train_step(run, step_state, step)
            if ctx.main and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
                run.logger.log(row)
            evaluation = None
            if cfg.eval.every and step % cfg.eval.every == 0 or step == cfg.train.steps:
                evaluation = evaluate(run, step)
                run.last_eval = evaluation or run.last_eval
            due = (
                (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
                or step == cfg.train.steps
                or step == stop_after
                or (on_eval is not None and (cfg.eval.every and step % cfg.eval.every == 0))
            )
            saved = save_checkpoint(run, step) if due else None
            if evaluation is not None and on_eval is not None:
                on_eval(step, {**row, **evaluation}, saved)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(
                    loss=f"{row.get('loss', 0):.3g}",
                    base=f"{row.get('base_nll', 0):.3f}",
                    mixed=f"{row.get('mixed_nll', float('nan')):.3f}",
                    tok_s=f"{row['tokens_per_s']:.0f}",
                )
            if stop_after is not None and step >= stop_after:
                return {"stopped_at": step, "run_dir": str(run_dir)}
    finally:
        if progress is not None:
            progress.close()
        cleanup(run)
    return finish(run)


class StepState:
    """What carries over between steps: the gradient splitter and the non-finite skip counts."""

    def __init__(self, cfg: RunConfig, run: Run):
        think = cfg.train.objective == "quiet_star"
        self.grad_parts = (
            diagnostics.GradParts(run.roles) if cfg.logging.grad_parts and think else None
        )
        self.skipped = 0  # consecutive non-finite steps skipped (train.on_nonfinite=skip)
        self.skipped_total = 0


def train_step(run: Run, state: StepState, step: int) -> dict[str, Any]:
    """One optimiser step over ``train.batch_size`` windows (gradient accumulation, clipping, the
    non-finite check); returns the step's metrics row."""
    cfg, ctx = run.cfg, run.ctx
    t0 = time.perf_counter()
    parts: dict[str, float] = {}
    tokens = 0
    for _ in range(run.accum):
        batches = [
            run.stream.next_batch(cfg.train.micro_batch_size) for _ in range(ctx.world)
        ]  # the same order everywhere
        ids, mask = (t.to(run.device) for t in batches[ctx.rank])
        tokens += int(mask.sum())
        with run.autocast:
            out = run.model(
                ids, attention_mask=mask, generator=run.generator, objective=cfg.train.objective
            )
        if state.grad_parts is not None:
            state.grad_parts.add(out.policy_term / run.accum)
        (out.loss / run.accum).backward()
        for key, value in out.stats().items():
            parts[key] = parts.get(key, 0.0) + value / run.accum
    parts = distributed.mean(parts, ctx)  # every process takes the same decisions
    diag = diagnostics.grad_norms(run.roles)
    if state.grad_parts is not None:
        diag.update(state.grad_parts.norms())
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.optim.grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
    bad = nonfinite_part(parts, float(grad_norm))
    if bad is not None:
        _skip_or_stop(run, state, step, bad)
    else:
        state.skipped = 0
    # the factor clipping multiplied every gradient by (clip_grad_norm_'s own formula)
    diag["grad_clip_coef"] = (
        min(1.0, cfg.optim.grad_clip / (float(grad_norm) + 1e-6)) if cfg.optim.grad_clip else 1.0
    )
    lr = run.optimizer.param_groups[0]["lr"]
    if bad is None:
        if run.tracker is not None:
            run.tracker.before_step()
        run.optimizer.step()
        if run.tracker is not None:
            diag.update(run.tracker.after_step())
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    else:  # a skipped step: the weights stay; the row says so instead of logging NaN
        parts = {"skipped_nonfinite": 1.0}
        diag = {"skipped_total": float(state.skipped_total)}
    tokens = distributed.total(tokens, ctx)
    dt = time.perf_counter() - t0
    run.tokens_total += tokens
    run.last_row = {
        "kind": "train",
        "step": step,
        **parts,
        "lr": lr,
        **({"grad_norm": float(grad_norm)} if bad is None else {}),
        **diag,
        "tokens": tokens,
        "tokens_per_s": tokens / dt,
        "step_s": dt,
        "peak_mem_mb": peak_memory_mb(run.device),
    }
    return run.last_row


def _skip_or_stop(run: Run, state: StepState, step: int, bad: str) -> None:
    cfg = run.cfg
    if cfg.train.on_nonfinite == "error" or state.skipped >= cfg.train.skip_limit:
        good = checkpoint.latest(run.run_dir)
        raise TrainingDiverged(
            f"training diverged at step {step}: non-finite {bad}"
            + (f" after {state.skipped} skipped steps" if state.skipped else "")
            + f"; last good checkpoint: {good or 'none'}; lower optim.lr"
            + (", or set train.on_nonfinite=skip" if cfg.train.on_nonfinite == "error" else "")
        )
    state.skipped += 1
    state.skipped_total += 1
    run.optimizer.zero_grad(set_to_none=True)
    if run.ctx.main:
        print(f"qstar: step {step}: non-finite {bad}; update skipped", file=sys.stderr)


def evaluate(run: Run, step: int) -> dict[str, float] | None:
    """Held-out NLL (and lm-eval tasks when due). Called on every process: the main process
    evaluates and logs (under FSDP all of them compute, since each holds a shard); every process
    gets the result (Ray Train reports it from all workers)."""
    cfg, ctx = run.cfg, run.ctx
    think = cfg.train.objective == "quiet_star"
    row: dict[str, float] = {}
    if ctx.main or run.fsdp:
        with run.autocast:
            if run.val_windows:
                per_token: dict[str, list[list[float]]] = {}
                row.update(
                    heldout_nll(
                        run.qs,
                        run.val_windows,
                        cfg.eval.batch_size,
                        run.device,
                        think=think,
                        per_token=per_token,
                    )
                )
                if ctx.main:
                    write_json(run.run_dir / "heldout" / f"step_{step}.json", per_token)
            if cfg.eval.tasks and tasks_due(cfg, step) and not run.fsdp:
                samples = run.run_dir / "tasks" / f"step_{step}" if ctx.main else None
                row.update(task_metrics(run.qs, cfg, think, samples))
                if think and cfg.eval.tasks_both and step > 0:
                    # at step 0 the zero-initialised mixing head makes both modes equal
                    row.update(task_metrics(run.qs, cfg, False, samples))
            if cfg.eval.qa and not run.fsdp:
                from qstar.recipes import star

                questions = star.load_examples(cfg, held_out=True)
                row.update(star.qa_accuracy(run.qs, cfg, questions[: cfg.star.eval_questions]))
        if run.tracker is not None:
            row.update(run.tracker.changed())
        if row and ctx.main:
            run.logger.log({"kind": "eval", "step": step, **row})
    row = distributed.broadcast(row, ctx)
    return row or None


def _progress(cfg: RunConfig, start: int):
    if not cfg.logging.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def format_summary(summary: dict[str, Any]) -> str:
    """The one-screen summary printed at the end of ``qstar train``."""
    f = summary.get("final", {})
    lines = [
        f"run directory   {summary['run_dir']}",
        f"steps           {summary['steps']}"
        + (f" (resumed from {summary['resumed_from']})" if summary.get("resumed_from") else ""),
        f"time            {summary['seconds']:.1f} s, {summary['tokens_per_s'] or 0:.0f} tokens/s, "
        f"peak memory {summary['peak_mem_mb']:.0f} MB",
        f"last step       loss {f.get('loss', float('nan')):.4g}  base NLL {f.get('base_nll', float('nan')):.4f}  "
        f"mixed NLL {f.get('mixed_nll', float('nan')):.4f}  policy {f.get('policy_loss', float('nan')):.3g}  "
        f"reward {f.get('reward_mean', float('nan')):.3g}  mixing w {f.get('mixing_weight_mean', float('nan')):.3g}",
    ]
    for name, ev in (
        ("held-out before", summary.get("eval_first")),
        ("held-out after", summary.get("eval_last")),
    ):
        if ev:
            text = f"NLL without thoughts {ev['eval/nll_base']:.4f}"
            if "eval/nll_thought" in ev:
                text += f", with thoughts {ev['eval/nll_thought']:.4f} (delta {ev['eval/nll_delta']:+.4f})"
            lines.append(f"{name:15} {text}")
    lines.append(f"final model     {summary['final_model']}")
    return "\n".join(lines)
