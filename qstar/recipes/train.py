"""The training recipe: setup -> train -> save, over the core components.

Run directory (written before step 0, read by sweeps and reports):
    config.yaml            the resolved configuration
    run.json               provenance: git sha, versions, model and data sources, command
    heldout.json           the validation windows (token ids) behind eval/nll_*
    metrics.jsonl          one JSON row per step (kind "train") and per evaluation (kind "eval")
    tb/                    TensorBoard events
    checkpoints/step_N/    see :mod:`qstar.checkpoint`; checkpoints/latest names the newest
    final/                 the trained model (``QuietStar.from_pretrained`` loads it)
    summary.json           final figures
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qstar.config import RunConfig, load_run_config
from qstar.core import learn
from qstar.core.model import QuietStar
from qstar.data import DataError, WindowStream, collate, fixed_windows, load_documents, tokenize
from qstar.errors import TrainingDiverged
from qstar.recipes import checkpoint, diagnostics, distributed
from qstar.recipes.tracking import MetricsLogger, provenance

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


def _weights_finite(params: list[torch.Tensor], ctx: distributed.Context) -> bool:
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


@torch.no_grad()
def heldout_nll(
    qs: QuietStar,
    windows: list[list[int]],
    batch_size: int,
    device,
    think: bool = True,
    per_token: dict[str, list[list[float]]] | None = None,
) -> dict[str, float]:
    """Next-token NLL on fixed windows without thoughts and, if ``think``, after greedy thoughts.

    ``per_token``: a dict that receives ``{"base": [[nll of each target] per window],
    "thought": [...]}`` (what reports bootstrap over and split by token difficulty)."""
    was_training = qs.training
    qs.eval()
    pad = qs.fill_id
    sums = {"base": 0.0, "thought": 0.0}
    tokens: dict[str, list[list[float]]] = {"base": [], "thought": []}
    count = 0
    try:
        for i in range(0, len(windows), batch_size):
            ids, mask = collate(windows[i : i + batch_size], pad)
            ids, mask = ids.to(device), mask.to(device)
            valid = (mask[:, 1:] & mask[:, :-1]).bool()
            targets = ids[:, 1:]
            count += int(valid.sum())
            scored = {"base": qs.base_logits(ids, mask)}
            if think:
                scored["thought"] = qs.mixed_logits(ids, mask)
            for name, logits in scored.items():
                lp = torch.log_softmax(logits[:, :-1].float(), -1)
                nll = learn.token_nll(lp, targets)  # (b, L-1)
                sums[name] += float(nll[valid].sum())
                tokens[name] += [
                    row[v].tolist() for row, v in zip(nll.cpu(), valid.cpu(), strict=True)
                ]
    finally:
        qs.train(was_training)
    out = {"eval/nll_base": sums["base"] / max(count, 1)}
    if think:
        out["eval/nll_thought"] = sums["thought"] / max(count, 1)
        out["eval/nll_delta"] = out["eval/nll_thought"] - out["eval/nll_base"]
    if per_token is not None:
        per_token.update({k: v for k, v in tokens.items() if v})
    return out


def task_metrics(
    qs: QuietStar, cfg: RunConfig, think: bool, samples_dir: Path | None = None
) -> dict[str, float]:
    """lm-eval ``eval.tasks`` on the live model: ``{"eval/TASK/METRIC": value}``.

    Without thinking (``think=False``) on a Quiet-STaR run the keys are ``eval/TASK:nothink/...``.
    ``samples_dir``: where to write each task's per-example metrics (``TASK[:nothink].jsonl``,
    one ``{"doc_id", METRIC: value}`` row per example), for paired confidence intervals."""
    from qstar.evaluation import backend as evaluation

    was_training = qs.training
    qs.eval()
    try:
        lm = evaluation.QStarLM(model=qs, think=think, batch_size=cfg.eval.batch_size)
        results = evaluation.evaluate(
            lm,
            cfg.eval.tasks,
            cfg.eval.limit,
            cfg.eval.include_paths,
            data_dir=cfg.data.data_dir,
            seed=cfg.train.seed,
            log_samples=samples_dir is not None,
        )
    finally:
        qs.train(was_training)
    suffix = "" if think or cfg.train.objective == "lm" else ":nothink"
    table = evaluation.metric_table(results)
    if samples_dir is not None:
        samples_dir.mkdir(parents=True, exist_ok=True)
        for task, rows in (results.get("samples") or {}).items():
            keep = set(table.get(task, {}))
            lines = [
                json.dumps({"doc_id": r.get("doc_id"), **{k: r[k] for k in sorted(keep) if k in r}})
                for r in rows
            ]
            (samples_dir / f"{task}{suffix}.jsonl").write_text("\n".join(lines) + "\n")
    return {
        f"eval/{task}{suffix}/{metric}": value
        for task, metrics in table.items()
        for metric, value in metrics.items()
    }


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


def _tasks_due(cfg: RunConfig, step: int) -> bool:
    """Whether ``eval.tasks`` run at this evaluation (``eval.tasks_at``)."""
    last = step == cfg.train.steps
    return {"every": True, "end": last, "start_end": last or step == 0}[cfg.eval.tasks_at]


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, separators=(",", ":")) + "\n")
    tmp.replace(path)


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def check_run_dir(run_dir: Path, cfg: RunConfig, resume: bool) -> Path | None:
    """Refuse to overwrite a run; on resume, require the same config. Returns the checkpoint."""
    existing = run_dir / "config.yaml"
    if not resume:
        if existing.exists() or (run_dir / "checkpoints").exists():
            raise ValueError(
                f"run directory {run_dir} already holds a run; pass --resume to continue "
                "it, or choose another --run-dir"
            )
        return None
    if existing.exists():
        saved = load_run_config(str(existing)).to_dict()
        diffs = _diff(saved, cfg.to_dict())
        if diffs:
            raise ValueError(
                f"--resume with a different config than {existing}: {', '.join(diffs[:5])}; "
                "resume with the same config and overrides"
            )
    return checkpoint.latest(run_dir)


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


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
    process trains on its share of every batch (see :mod:`qstar.distributed`)."""
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
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if cfg.train.precision == "bf16-autocast"
        else contextlib.nullcontext()
    )
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
    micro = cfg.train.micro_batch_size
    if cfg.train.batch_size % (micro * ctx.world):
        raise ValueError(
            f"train.batch_size ({cfg.train.batch_size}) must be a multiple of "
            f"micro_batch_size x processes ({micro} x {ctx.world})"
        )
    accum = cfg.train.batch_size // (micro * ctx.world)
    ckpt = check_run_dir(run_dir, cfg, resume)  # every process checks before any writes
    distributed.barrier(ctx)
    device = distributed.device_for(ctx, pick_device(cfg.train.device))
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    strategy = cfg.train.parallel
    fsdp = distributed.sharded(ctx, strategy)
    # a bad model or data source fails here, before anything is written. Under FSDP the whole
    # model is built in host memory and each layer moves to the device as it is sharded, so no
    # device ever holds all of it.
    qs = build_model(cfg, torch.device("cpu") if fsdp else device)
    stream, val_windows, data_info = prepare_data(cfg, qs.tokenizer)
    if ctx.main:
        if resume and ckpt is None:
            print(f"qstar: no checkpoint in {run_dir}; starting from step 0", file=sys.stderr)
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    if ctx.main and ckpt is None:
        info = {
            "model": cfg.model.name,
            "model_class": type(qs.base_model).__name__,
            "device": str(device),
            "processes": ctx.world,
            **data_info,
        }
        (run_dir / "run.json").write_text(json.dumps(provenance(info), indent=2) + "\n")
        # the held-out windows as token ids, so reports can analyse the run without its data source
        (run_dir / "heldout.json").write_text(json.dumps({"windows": val_windows}) + "\n")
    if ctx.main and data_info["skipped_rows"]:
        print(
            f"qstar: skipped {data_info['skipped_rows']} bad rows, e.g. {data_info['skipped_examples'][0]}",
            file=sys.stderr,
        )

    think = cfg.train.objective == "quiet_star"
    if cfg.train.trainable == "heads":
        if not think:
            raise ValueError(
                "train.trainable=heads freezes the language model, so train.objective=lm would "
                "train nothing; use train.trainable=all for the no-thought baseline"
            )
        qs.base_model.requires_grad_(False)
    if ckpt is not None and fsdp:
        checkpoint.load_weights(ckpt, qs)  # whole tensors, before sharding
    qs.train()
    if cfg.train.compile:
        compile_layers(qs)
    model = distributed.wrap(qs, ctx, find_unused=not think, strategy=strategy)
    named = [(n, p) for n, p in qs.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    roles = diagnostics.parameter_roles(qs)
    grad_parts = diagnostics.GradParts(roles) if cfg.logging.grad_parts and think else None
    generator = torch.Generator().manual_seed(cfg.train.seed + ctx.rank)

    start, keep_lines = 0, None
    if ckpt is not None:
        state = checkpoint.load(
            ckpt,
            None if fsdp else qs,
            optimizer,
            scheduler,
            generator,
            rank=ctx.rank,
            load_named_optimizer=(
                (lambda st: distributed.load_full_optimizer_state(qs, optimizer, st))
                if fsdp
                else None
            ),
            param_names=[n for n, _ in named],
        )
        start, keep_lines = int(state["step"]), int(state["metrics_lines"])
        stream.load_state(state["data"])
        if ctx.main:
            print(f"qstar: resumed from {ckpt} (step {start})", file=sys.stderr)
    # made after a resume: changed_frac then counts from the resumed weights
    tracker = diagnostics.ParamTracker(roles) if cfg.logging.param_stats else None
    logger = None
    if ctx.main:
        logger = MetricsLogger(
            run_dir,
            cfg.logging.tensorboard,
            cfg.logging.mlflow,
            cfg.logging.mlflow_tracking_uri,
            cfg.logging.experiment,
            params=cfg.to_dict(),
            keep_lines=keep_lines or 0,
        )
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if cfg.train.precision == "bf16-autocast"
        else contextlib.nullcontext()
    )

    def evaluate(step: int) -> dict[str, float] | None:
        """Called on every process. The main process evaluates and logs (under FSDP all of them
        compute, since each holds a shard); every process gets the result (Ray Train reports it
        from all workers)."""
        row: dict[str, float] = {}
        if ctx.main or fsdp:
            with autocast:
                if val_windows:
                    per_token: dict[str, list[list[float]]] = {}
                    row.update(
                        heldout_nll(
                            qs,
                            val_windows,
                            cfg.eval.batch_size,
                            device,
                            think=think,
                            per_token=per_token,
                        )
                    )
                    if ctx.main:
                        _write_json(run_dir / "heldout" / f"step_{step}.json", per_token)
                if cfg.eval.tasks and _tasks_due(cfg, step) and not fsdp:
                    samples = run_dir / "tasks" / f"step_{step}" if ctx.main else None
                    row.update(task_metrics(qs, cfg, think, samples))
                    if think and cfg.eval.tasks_both and step > 0:
                        # at step 0 the zero-initialised mixing head makes both modes equal
                        row.update(task_metrics(qs, cfg, False, samples))
            if tracker is not None:
                row.update(tracker.changed())
            if row and ctx.main:
                logger.log({"kind": "eval", "step": step, **row})
        row = distributed.broadcast(row, ctx)
        return row or None

    first_eval = evaluate(0) if start == 0 else None
    if first_eval is not None and on_eval is not None:
        on_eval(0, {"kind": "eval", "step": 0, **first_eval}, None)
    last_eval = first_eval
    progress = _progress(cfg, start) if ctx.main else None
    tokens_total = 0
    skipped = skipped_total = 0  # consecutive and all non-finite steps skipped (on_nonfinite=skip)
    t_start = time.perf_counter()
    last_row: dict[str, Any] = {}
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            parts: dict[str, float] = {}
            tokens = 0
            for _ in range(accum):
                batches = [
                    stream.next_batch(micro) for _ in range(ctx.world)
                ]  # the same order everywhere
                ids, mask = (t.to(device) for t in batches[ctx.rank])
                tokens += int(mask.sum())
                with autocast:
                    out = model(
                        ids, attention_mask=mask, generator=generator, objective=cfg.train.objective
                    )
                if grad_parts is not None:
                    grad_parts.add(out.policy_term / accum)
                (out.loss / accum).backward()
                stats = (
                    out.stats()
                    if think
                    else {"loss": float(out.loss.detach()), "base_nll": float(out.base_nll)}
                )
                for key, value in stats.items():
                    parts[key] = parts.get(key, 0.0) + value / accum
            parts = distributed.mean(parts, ctx)  # every process takes the same decisions
            diag = diagnostics.grad_norms(roles)
            if grad_parts is not None:
                diag.update(grad_parts.norms())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
                grad_norm = grad_norm.full_tensor()
            bad = nonfinite_part(parts, float(grad_norm))
            if bad is not None:
                if cfg.train.on_nonfinite == "error" or skipped >= cfg.train.skip_limit:
                    good = checkpoint.latest(run_dir)
                    raise TrainingDiverged(
                        f"training diverged at step {step}: non-finite {bad}"
                        + (f" after {skipped} skipped steps" if skipped else "")
                        + f"; last good checkpoint: {good or 'none'}; lower optim.lr"
                        + (
                            ", or set train.on_nonfinite=skip"
                            if cfg.train.on_nonfinite == "error"
                            else ""
                        )
                    )
                skipped += 1
                skipped_total += 1
                optimizer.zero_grad(set_to_none=True)
                if ctx.main:
                    print(f"qstar: step {step}: non-finite {bad}; update skipped", file=sys.stderr)
            else:
                skipped = 0
            # the factor clipping multiplied every gradient by (clip_grad_norm_'s own formula)
            diag["grad_clip_coef"] = (
                min(1.0, cfg.optim.grad_clip / (float(grad_norm) + 1e-6))
                if cfg.optim.grad_clip
                else 1.0
            )
            lr = optimizer.param_groups[0]["lr"]
            if bad is None:
                if tracker is not None:
                    tracker.before_step()
                optimizer.step()
                if tracker is not None:
                    diag.update(tracker.after_step())
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            else:  # a skipped step: the weights stay; the row says so instead of logging NaN
                parts = {"skipped_nonfinite": 1.0}
                diag = {"skipped_total": float(skipped_total)}
            tokens = distributed.total(tokens, ctx)
            dt = time.perf_counter() - t0
            tokens_total += tokens
            last_row = {
                "kind": "train",
                "step": step,
                **parts,
                "lr": lr,
                **({"grad_norm": float(grad_norm)} if bad is None else {}),
                **diag,
                "tokens": tokens,
                "tokens_per_s": tokens / dt,
                "step_s": dt,
                "peak_mem_mb": peak_memory_mb(device),
            }
            if ctx.main and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
                logger.log(last_row)
            row = None
            if cfg.eval.every and step % cfg.eval.every == 0 or step == cfg.train.steps:
                row = evaluate(step)
                last_eval = row or last_eval
            due = (
                (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
                or step == cfg.train.steps
                or step == stop_after
                or (on_eval is not None and (cfg.eval.every and step % cfg.eval.every == 0))
            )
            saved = None
            if due and not _weights_finite(params, ctx):
                raise TrainingDiverged(
                    f"training diverged at step {step}: non-finite weights after the update; "
                    f"last good checkpoint: {checkpoint.latest(run_dir) or 'none'}; lower optim.lr"
                )
            if due:  # every process takes part: their sampling generators are saved too
                states = distributed.gather(generator.get_state(), ctx)
                model_state = distributed.full_model_state(qs, ctx, strategy)
                optimizer_state = distributed.full_optimizer_state(qs, optimizer, ctx, strategy)
                if ctx.main:
                    saved = checkpoint.save(
                        run_dir,
                        step,
                        qs,
                        optimizer,
                        scheduler,
                        generator,
                        {"data": stream.state(), "metrics_lines": logger.line_count()},
                        cfg.train.keep_checkpoints,
                        rank_generators=states,
                        model_state=model_state,
                        optimizer_state=optimizer_state,
                    )
                distributed.barrier(ctx)
            if row is not None and on_eval is not None:
                on_eval(step, {**last_row, **row}, saved)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(
                    loss=f"{parts.get('loss', 0):.3g}",
                    base=f"{parts.get('base_nll', 0):.3f}",
                    mixed=f"{parts.get('mixed_nll', float('nan')):.3f}",
                    tok_s=f"{tokens / dt:.0f}",
                )
            if stop_after is not None and step >= stop_after:
                return {"stopped_at": step, "run_dir": str(run_dir)}
    finally:
        if progress is not None:
            progress.close()
        if logger is not None:
            logger.close()

    final_state = distributed.full_model_state(qs, ctx, strategy)
    if not ctx.main:
        distributed.barrier(ctx)
        return {}
    final_dir = qs.save_pretrained(run_dir / "final", state_dict=final_state)
    elapsed = time.perf_counter() - t_start
    summary = {
        "run_dir": str(run_dir),
        "steps": cfg.train.steps,
        "resumed_from": start or None,
        "processes": ctx.world,
        "seconds": elapsed,
        "tokens_per_s": tokens_total / elapsed if elapsed else None,
        "peak_mem_mb": peak_memory_mb(device),
        "final": {k: v for k, v in last_row.items() if k != "kind"},
        "eval_first": first_eval,
        "eval_last": last_eval,
        "final_model": str(final_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    distributed.barrier(ctx)
    return summary


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
