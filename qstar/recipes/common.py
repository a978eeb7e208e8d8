"""What every training recipe shares: building the model and the data, the run directory, the
optimiser and its schedule, resuming, checkpoints, the end of a run (:class:`Run`, :func:`setup`,
:func:`save_checkpoint`, :func:`finish`, :func:`cleanup`). A new recipe (another training
method) reuses these and writes only its own step and evaluation. The run directory
is written by :mod:`qstar.recipes.rundir`.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qstar.core.model import QuietStar
from qstar.data import DataError, WindowStream, fixed_windows, load_documents, tokenize
from qstar.recipes import checkpoint, diagnostics, distributed
from qstar.recipes.rundir import check_run_dir, write_run_dir
from qstar.recipes.tracking import MetricsLogger, read_metrics
from qstar.run_config import RunConfig

NONFINITE_PARTS = (
    ("base_nll", "base NLL"),
    ("mixed_nll", "mixed NLL"),
    ("policy_loss", "policy term"),
    ("loss", "loss"),
)


def nonfinite_part(parts: dict[str, float], grad_norm: float) -> str | None:
    """Which part of a step is not finite (``"policy term (nan)"``), or ``None``."""
    for key, name in NONFINITE_PARTS:
        value = parts.get(key)
        if value is not None and not math.isfinite(value):
            return f"{name} ({value})"
    if not math.isfinite(grad_norm):
        return f"gradient norm ({grad_norm})"
    return None


def weights_finite(params: list[torch.Tensor], ctx: distributed.Context) -> bool:
    local = all(
        bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in params
    )
    return distributed.mean({"bad": float(not local)}, ctx)["bad"] == 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available; use train.device=auto")
    return torch.device(name)


def autocast_for(cfg: RunConfig, device: torch.device):
    """The context every forward of a run runs in: bf16 autocast under
    ``train.precision=bf16-autocast``, else nothing."""
    if cfg.train.precision == "bf16-autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(cfg: RunConfig, device: torch.device) -> QuietStar:
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    qs = QuietStar.from_pretrained(
        cfg.model.name,
        cfg.quiet_star,
        dtype=dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
    )
    return qs.to(device)


def compile_layers(qs: QuietStar) -> int:
    """``torch.compile`` each decoder layer in place (regional compilation, dynamic shapes: the
    thought passes change the key length at every depth). Returns the number of layers."""
    from qstar.core import hf

    layers = hf.decoder_layers(qs.base_model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def lr_lambda(cfg: RunConfig):
    warmup, total, kind = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.schedule

    def fn(step: int) -> float:  # step = optimiser steps taken so far
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def prepare_data(cfg: RunConfig, tokenizer) -> tuple[WindowStream, list[list[int]], dict[str, Any]]:
    d = cfg.data
    common = dict(
        text_field=d.text_field,
        template=d.template,
        on_bad_row=d.on_bad_row,
        configured_dir=d.data_dir,
        hub_config=d.hub_config,
        seed=cfg.train.seed,
        shuffle_buffer=d.shuffle_buffer,
    )
    held_out = 0 if d.val_source else d.val_documents
    limit = None if d.max_documents is None else d.max_documents + held_out
    docs = load_documents(d.source, d.split, max_documents=limit, **common)
    train_docs = tokenize(tokenizer, docs.texts)
    if d.val_source:
        val = load_documents(
            d.val_source, d.val_split or d.split, max_documents=max(cfg.eval.windows, 1), **common
        )
        val_docs = tokenize(tokenizer, val.texts)
    else:
        order = list(range(len(train_docs)))
        random.Random(cfg.train.seed).shuffle(order)
        if held_out >= len(order):
            raise DataError(
                f"data.val_documents={held_out} leaves no training documents "
                f"({len(order)} usable); lower it or set data.val_source"
            )
        val_docs = [train_docs[i] for i in order[:held_out]]
        train_docs = [train_docs[i] for i in order[held_out:]]
    eos = tokenizer.eos_token_id
    stream = WindowStream(
        train_docs, d.window, d.windowing, cfg.train.seed, pad_id=_pad_id(tokenizer), eos_id=eos
    )
    windows = (
        fixed_windows(
            val_docs,
            d.window,
            cfg.eval.windows,
            cfg.train.seed if cfg.eval.heldout_seed is None else cfg.eval.heldout_seed,
        )
        if val_docs and cfg.eval.windows
        else []
    )
    info = {
        "data_source": docs.source,
        "data_origin": docs.origin,
        **({"val_data_source": val.source, "val_data_origin": val.origin} if d.val_source else {}),
        "train_documents": len(train_docs),
        "val_windows": len(windows),
        "skipped_rows": docs.skipped,
        "skipped_examples": docs.skipped_examples,
    }
    return stream, windows, info


def tasks_due(cfg: RunConfig, step: int) -> bool:
    """Whether ``eval.tasks`` run at this evaluation (``eval.tasks_at``)."""
    last = step == cfg.train.steps
    return {"every": True, "end": last, "start_end": last or step == 0}[cfg.eval.tasks_at]


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


@dataclass
class Run:
    """The state of one training run that every recipe has."""

    cfg: RunConfig
    run_dir: Path
    ctx: distributed.Context
    device: torch.device
    qs: QuietStar
    model: torch.nn.Module  # what the step calls: qs, or a data-parallel wrapper around it
    stream: WindowStream
    val_windows: list[list[int]]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    params: list[torch.nn.Parameter]
    roles: dict[str, list]
    logger: MetricsLogger | None
    autocast: Any
    start: int
    fsdp: bool
    accum: int
    tracker: diagnostics.ParamTracker | None = None
    tokens_total: int = 0
    t_start: float = field(default_factory=time.perf_counter)
    last_row: dict[str, Any] = field(default_factory=dict)
    first_eval: dict[str, float] | None = None
    last_eval: dict[str, float] | None = None


def setup(cfg: RunConfig, run_dir: Path, resume: bool, ctx: distributed.Context) -> Run:
    """Model, data, run directory, optimiser, schedule and (on ``resume``) the last checkpoint.
    A bad model or data source fails before anything is written."""
    accum = _accumulation(cfg, ctx)
    ckpt = check_run_dir(run_dir, cfg, resume)  # every process checks before any writes
    distributed.barrier(ctx)
    device = distributed.device_for(ctx, pick_device(cfg.train.device))
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    fsdp = distributed.sharded(ctx, cfg.train.parallel)
    # Under FSDP the whole model is built in host memory and each layer moves to the device as it
    # is sharded, so no device ever holds all of it.
    qs = build_model(cfg, torch.device("cpu") if fsdp else device)
    stream, val_windows, data_info = prepare_data(cfg, qs.tokenizer)
    write_run_dir(cfg, run_dir, ctx, resume, ckpt, qs, device, val_windows, data_info)
    model = _prepare_for_training(cfg, qs, ctx, ckpt if fsdp else None)
    named = [(n, p) for n, p in qs.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer, scheduler = build_optimizer(cfg, params)
    roles = diagnostics.parameter_roles(qs)
    generator = torch.Generator().manual_seed(cfg.train.seed + ctx.rank)
    start, keep_lines = 0, 0
    if ckpt is not None:
        start, keep_lines = _restore(
            ckpt, qs, named, optimizer, scheduler, generator, stream, ctx, fsdp
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
    autocast = autocast_for(cfg, device)
    run = Run(
        cfg,
        run_dir,
        ctx,
        device,
        qs,
        model,
        stream,
        val_windows,
        optimizer,
        scheduler,
        generator,
        params,
        roles,
        logger,
        autocast,
        start,
        fsdp,
        accum,
        # made after a resume: changed_frac then counts from the resumed weights
        tracker=diagnostics.ParamTracker(roles) if cfg.logging.param_stats else None,
    )
    if ckpt is not None and ctx.main:  # the summary of a resumed run covers the whole run
        run.first_eval, run.last_eval, run.last_row = _history(run_dir / "metrics.jsonl")
    return run


def _history(metrics: Path) -> tuple[dict | None, dict | None, dict[str, Any]]:
    """``(first evaluation, last evaluation, last train row)`` already in ``metrics.jsonl``."""
    rows = read_metrics(metrics) if metrics.is_file() else []  # truncated to the checkpoint
    evals = [
        {k: v for k, v in r.items() if k not in ("kind", "step")}
        for r in rows
        if r.get("kind") == "eval"
    ]
    train_rows = [r for r in rows if r.get("kind") == "train"]
    return (
        evals[0] if evals else None,
        evals[-1] if evals else None,
        train_rows[-1] if train_rows else {},
    )


def _accumulation(cfg: RunConfig, ctx: distributed.Context) -> int:
    """Micro-batches per optimiser step and process."""
    micro = cfg.train.micro_batch_size
    if cfg.train.batch_size % (micro * ctx.world):
        raise ValueError(
            f"train.batch_size ({cfg.train.batch_size}) must be a multiple of "
            f"micro_batch_size x processes ({micro} x {ctx.world})"
        )
    return cfg.train.batch_size // (micro * ctx.world)


def _prepare_for_training(
    cfg: RunConfig, qs: QuietStar, ctx: distributed.Context, fsdp_ckpt: Path | None
) -> torch.nn.Module:
    """Trainable parts, (sharded runs) the checkpoint's whole weights before sharding, training
    mode, fused head, compilation; returns what the step calls (``qs`` or a wrapper around it)."""
    think = cfg.train.objective == "quiet_star"
    if cfg.train.trainable == "heads":
        if not think:
            raise ValueError(
                "train.trainable=heads freezes the language model, so train.objective=lm would "
                "train nothing; use train.trainable=all for the no-thought baseline"
            )
        qs.base_model.requires_grad_(False)
    if fsdp_ckpt is not None:
        checkpoint.load_weights(fsdp_ckpt, qs)  # whole tensors, before sharding
    qs.train()
    qs.fused_ce = cfg.train.fused_ce
    if cfg.train.compile:
        compile_layers(qs)
    return distributed.wrap(qs, ctx, find_unused=not think, strategy=cfg.train.parallel)


def build_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter]):
    """AdamW and the learning-rate schedule of ``cfg.optim``."""
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def _restore(
    ckpt, qs, named, optimizer, scheduler, generator, stream, ctx, fsdp
) -> tuple[int, int]:
    """Load a checkpoint's optimiser, schedule, generator and data position (and, unsharded, its
    weights); returns ``(step, metrics lines to keep)``."""
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
    stream.load_state(state["data"])
    if ctx.main:
        print(f"qstar: resumed from {ckpt} (step {int(state['step'])})", file=sys.stderr)
    return int(state["step"]), int(state["metrics_lines"])


def save_checkpoint(run: Run, step: int) -> Path | None:
    """Every process takes part (their sampling generators are saved too); the main one writes.
    Refuses to save non-finite weights. Returns the checkpoint on the main process."""
    from qstar.errors import TrainingDiverged

    ctx, strategy = run.ctx, run.cfg.train.parallel
    if not weights_finite(run.params, ctx):
        raise TrainingDiverged(
            f"training diverged at step {step}: non-finite weights after the update; "
            f"last good checkpoint: {checkpoint.latest(run.run_dir) or 'none'}; lower optim.lr"
        )
    states = distributed.gather(run.generator.get_state(), ctx)
    model_state = distributed.full_model_state(run.qs, ctx, strategy)
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
            {"data": run.stream.state(), "metrics_lines": run.logger.line_count()},
            run.cfg.train.keep_checkpoints,
            rank_generators=states,
            model_state=model_state,
            optimizer_state=optimizer_state,
        )
    distributed.barrier(ctx)
    return saved


def finish(run: Run) -> dict[str, Any]:
    """Write ``final/`` and ``summary.json``; returns the summary (``{}`` on other processes)."""
    ctx, cfg = run.ctx, run.cfg
    final_state = distributed.full_model_state(run.qs, ctx, cfg.train.parallel)
    if not ctx.main:
        distributed.barrier(ctx)
        return {}
    final_dir = run.qs.save_pretrained(run.run_dir / "final", state_dict=final_state)
    elapsed = time.perf_counter() - run.t_start
    summary = {
        "run_dir": str(run.run_dir),
        "steps": cfg.train.steps,
        "resumed_from": run.start or None,
        "processes": ctx.world,
        "seconds": elapsed,
        "tokens_per_s": run.tokens_total / elapsed if elapsed else None,
        "peak_mem_mb": peak_memory_mb(run.device),
        "final": {k: v for k, v in run.last_row.items() if k != "kind"},
        "eval_first": run.first_eval,
        "eval_last": run.last_eval,
        "final_model": str(final_dir),
    }
    (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    distributed.barrier(ctx)
    return summary


def cleanup(run: Run) -> None:
    if run.logger is not None:
        run.logger.close()
