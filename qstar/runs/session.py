"""A run's shared state and its life cycle, the same for every recipe: :func:`open_run` (check
the run directory, seed, build the model, let the recipe load its data, write the run
directory, choose what trains, wrap for several processes, build the optimiser, restore the
last checkpoint), :func:`save` (one atomic checkpoint format, with the recipe's own state),
:func:`finish` (``final/`` and ``summary.json``) and :func:`close`."""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qstar.core.model import QuietStar
from qstar.errors import TrainingDiverged
from qstar.run_config import RunConfig
from qstar.runs import checkpoint, diagnostics, distributed
from qstar.runs.build import (
    autocast_for,
    build_model,
    build_optimizer,
    compile_layers,
    param_groups,
    peak_memory_mb,
    pick_device,
)
from qstar.runs.rundir import check_run_dir, start_run_dir, write_summary
from qstar.runs.state import Run
from qstar.runs.step import weights_finite
from qstar.runs.tracking import MetricsLogger
from qstar.runs.trainable import prepare_trainable, trainable_parameters


def accumulation(cfg: RunConfig, ctx: distributed.Context) -> int:
    """Micro-batches per optimiser step and process."""
    micro = cfg.train.micro_batch_size
    if cfg.train.batch_size % (micro * ctx.world):
        raise ValueError(
            f"train.batch_size ({cfg.train.batch_size}) must be a multiple of "
            f"micro_batch_size x processes ({micro} x {ctx.world})"
        )
    return cfg.train.batch_size // (micro * ctx.world)


def open_run(
    cfg: RunConfig,
    run_dir: Path,
    resume: bool,
    ctx: distributed.Context,
    prepare: Callable[[QuietStar, distributed.Context], dict[str, Any]],
    thinks: bool,
    find_unused: bool,
) -> Run:
    """Everything before a run's first step (the module docstring). ``prepare(qs)``: the
    recipe loads its data (with the model's tokenizer) and returns what ``run.json`` records
    of it; a bad model or data source fails before anything is written. ``thinks``: whether
    the run's objective uses thoughts; ``find_unused``: some trainable parameters get no
    gradient (data-parallel runs must know)."""
    accum = accumulation(cfg, ctx)
    ckpt = check_run_dir(run_dir, cfg, resume)  # every process checks before any writes
    distributed.barrier(ctx)
    device = distributed.device_for(ctx, pick_device(cfg.train.device))
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    fsdp = distributed.sharded(ctx, cfg.train.parallel)
    # Under FSDP the whole model is built in host memory and each layer moves to the device as it
    # is sharded, so no device ever holds all of it.
    qs = build_model(cfg, torch.device("cpu") if fsdp else device)
    info = prepare(qs, ctx)
    t = cfg.train
    lora = (t.lora_rank, t.lora_alpha, t.lora_targets)
    prepare_trainable(qs, t.trainable, thinks, lora)  # before anything is written or wrapped
    start_run_dir(run_dir, cfg, ctx.main, resume, ckpt, _model_info(cfg, qs, device, ctx) | info)
    if fsdp and ckpt is not None:
        checkpoint.load_weights(ckpt, qs)  # whole tensors, before sharding
    qs.train()
    if cfg.train.compile:
        compile_layers(qs)
    model = distributed.wrap(qs, ctx, find_unused=find_unused, strategy=cfg.train.parallel)
    roles = diagnostics.parameter_roles(qs)  # after sharding, which replaces the parameters
    named, groups = optimizer_layout(cfg, qs, roles)
    params = [p for _, p in named]
    optimizer, scheduler = build_optimizer(cfg, groups)
    generator = torch.Generator().manual_seed(cfg.train.seed + ctx.rank)
    start, keep_lines, state = 0, 0, None
    if ckpt is not None:
        start, keep_lines, state = _restore(
            ckpt, qs, named, optimizer, scheduler, generator, ctx, fsdp
        )
    logger = None
    if ctx.main:
        logger = MetricsLogger(
            run_dir,
            cfg.logging.tensorboard,
            cfg.logging.mlflow,
            cfg.logging.mlflow_tracking_uri,
            cfg.logging.experiment,
            params=cfg.to_dict(),
            keep_lines=keep_lines,
        )
    return Run(
        cfg,
        run_dir,
        ctx,
        device,
        qs,
        model,
        optimizer,
        scheduler,
        generator,
        params,
        roles,
        logger,
        autocast_for(cfg, device),
        start,
        fsdp,
        accum,
        resumed_state=state,
        # made after a resume: changed_frac then counts from the resumed weights
        tracker=diagnostics.ParamTracker(roles) if cfg.logging.param_stats else None,
        grad_parts=(diagnostics.GradParts(roles) if cfg.logging.grad_parts and thinks else None),
    )


def optimizer_layout(cfg: RunConfig, qs: QuietStar, roles: dict) -> tuple[list, list]:
    """The trainable ``(name, parameter)`` pairs in the optimiser's order, and what to build it
    from: one group of all parameters (as every run before role learning rates), or with any
    ``optim.*_lr_scale`` set one group per role (:func:`qstar.runs.build.param_groups`)."""
    if all(scale == 1.0 for scale in cfg.optim.lr_scales().values()):
        named = trainable_parameters(qs)
        return named, [p for _, p in named]
    return [pair for ps in roles.values() for pair in ps], param_groups(cfg, roles)


def _model_info(cfg: RunConfig, qs: QuietStar, device, ctx: distributed.Context) -> dict[str, Any]:
    return {
        "method": cfg.train.method,
        "model": cfg.model.name,
        "model_class": type(qs.base_model).__name__,
        "model_source": getattr(qs.base_model, "qstar_source", None),
        "device": str(device),
        "processes": ctx.world,
    }


def _restore(ckpt, qs, named, optimizer, scheduler, generator, ctx, fsdp):
    """Load a checkpoint's optimiser, schedule, generators (and, unsharded, its weights);
    returns ``(step, metrics lines to keep, the recipe's state)``."""
    state = checkpoint.load(
        ckpt,
        None if fsdp else qs,
        optimizer,
        scheduler,
        generator,
        rank=ctx.rank,
        load_named_optimizer=(
            (lambda st: distributed.load_full_optimizer_state(qs, optimizer, st)) if fsdp else None
        ),
        param_names=[n for n, _ in named],
    )
    if ctx.main:
        print(f"qstar: resumed from {ckpt} (step {int(state['step'])})", file=sys.stderr)
    # checkpoints written before recipes owned their state kept the data position at the top
    recipe_state = state.get("recipe", {"data": state["data"]} if "data" in state else {})
    if "tensors" in state:
        recipe_state = {**recipe_state, "tensors": state["tensors"]}
    return int(state["step"]), int(state["metrics_lines"]), recipe_state


def save(
    run: Run,
    step: int,
    recipe_state: dict[str, Any],
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path | None:
    """Checkpoint ``step`` with the recipe's state (JSON). Every process takes part (their
    sampling generators are saved too); the main one writes. Refuses to save non-finite
    weights. Returns the checkpoint on the main process."""
    ctx, strategy = run.ctx, run.cfg.train.parallel
    if not weights_finite(run.params, ctx):
        raise TrainingDiverged(
            f"training diverged at step {step}: non-finite weights after the update; "
            f"last good checkpoint: {checkpoint.latest(run.run_dir) or 'none'}; lower optim.lr"
        )
    states = distributed.gather(run.generator.get_state(), ctx)
    model_state = distributed.full_model_state(run.qs, ctx, strategy)
    if run.cfg.train.trainable == "lora":  # what trains; the frozen base comes from its source
        model_state = {n: p.detach() for n, p in run.qs.named_parameters() if p.requires_grad}
    optimizer_state = distributed.full_optimizer_state(run.qs, run.optimizer, ctx, strategy)
    saved = None
    if ctx.main:
        saved = checkpoint.save(
            run.run_dir,
            step,
            run.qs,
            run.optimizer,
            run.scheduler,
            run.generator,
            {"recipe": recipe_state, "metrics_lines": run.logger.line_count()},
            run.cfg.train.keep_checkpoints,
            rank_generators=states,
            model_state=model_state,
            optimizer_state=optimizer_state,
            tensors=tensors,
        )
    distributed.barrier(ctx)
    return saved


def finish(run: Run, summary: dict[str, Any]) -> dict[str, Any]:
    """Write ``final/`` and ``summary.json`` (the common figures, then the recipe's
    ``summary``); returns it (``{}`` on other processes)."""
    ctx = run.ctx
    final_state = distributed.full_model_state(run.qs, ctx, run.cfg.train.parallel)
    if not ctx.main:
        distributed.barrier(ctx)
        return {}
    final_dir = run.qs.save_pretrained(run.run_dir / "final", state_dict=final_state)
    out = {
        "run_dir": str(run.run_dir),
        "method": run.cfg.train.method,
        "resumed_from": run.start or None,
        "processes": ctx.world,
        "seconds": time.perf_counter() - run.t_start,
        "peak_mem_mb": peak_memory_mb(run.device),
        **summary,
        "final_model": str(final_dir),
    }
    write_summary(run.run_dir, out)
    distributed.barrier(ctx)
    return out


def close(run: Run) -> None:
    if run.logger is not None:
        run.logger.close()
