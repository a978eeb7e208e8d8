"""What a run is built from: the device, the precision context, the model, the optimiser and its
learning-rate schedule (every recipe builds them here, from its config)."""

from __future__ import annotations

import contextlib
import math
import resource

import torch

from qstar.core import hf
from qstar.core.model import QuietStar
from qstar.run_config import RunConfig


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


def model_dtype(cfg: RunConfig) -> torch.dtype:
    """Parameters in bf16 under ``train.precision=bf16`` (the authors'), and the frozen base
    weights of a LoRA run under bf16 autocast; else fp32."""
    if cfg.train.precision == "bf16":
        return torch.bfloat16
    if cfg.train.trainable == "lora" and cfg.train.precision == "bf16-autocast":
        return torch.bfloat16
    return torch.float32


def build_model(cfg: RunConfig, device: torch.device) -> QuietStar:
    """The run's model from ``model.name`` with the ``quiet_star`` section's model settings and
    ``train.fused_ce``."""
    qcfg = cfg.quiet_star.model_config().replace(fused_ce=cfg.train.fused_ce)
    qs = QuietStar.from_pretrained(
        cfg.model.name,
        qcfg,
        dtype=model_dtype(cfg),
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
    )
    return qs.to(device)


def compile_layers(qs: QuietStar) -> int:
    """``torch.compile`` each decoder layer in place (regional compilation, dynamic shapes: the
    thought passes change the key length at every depth). Returns the number of layers."""
    layers = hf.decoder_layers(qs.base_model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def lr_lambda(cfg: RunConfig, total: int | None = None):
    """Warmup then ``optim.schedule`` over ``total`` optimiser steps (default ``train.steps``)."""
    warmup, kind = cfg.optim.warmup_steps, cfg.optim.schedule
    total = cfg.train.steps if total is None else total

    def fn(step: int) -> float:  # step = optimiser steps taken so far
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def param_groups(
    cfg: RunConfig, roles: dict[str, list[tuple[str, torch.nn.Parameter]]]
) -> list[dict]:
    """One AdamW group per parameter role at ``optim.lr`` times the role's scale
    (:meth:`qstar.sections.OptimSection.lr_scales`), in the roles' order."""
    scales = cfg.optim.lr_scales()
    return [
        {"params": [p for _, p in ps], "lr": cfg.optim.lr * scales.get(role, 1.0), "role": role}
        for role, ps in roles.items()
    ]


def build_optimizer(cfg: RunConfig, params: list, total: int | None = None):
    """AdamW and the learning-rate schedule of ``cfg.optim`` (over ``total`` steps). ``params``:
    parameters, or parameter groups (:func:`param_groups`)."""
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
