"""One optimiser step, the same for every recipe: per-role gradient norms, clipping, the
non-finite check (stop with the last good checkpoint named, or skip), the update and its
diagnostics, the schedule."""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from qstar.errors import TrainingDiverged
from qstar.runs import checkpoint, diagnostics, distributed
from qstar.runs.state import Run

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
    for key, value in parts.items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key} ({value})"
    if not math.isfinite(grad_norm):
        return f"gradient norm ({grad_norm})"
    return None


def weights_finite(params: list[torch.Tensor], ctx: distributed.Context) -> bool:
    local = all(
        bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in params
    )
    return distributed.mean({"bad": float(not local)}, ctx)["bad"] == 0


def optimizer_step(run: Run, parts: dict[str, float], step: int) -> dict[str, Any]:
    """Clip, check, update and schedule after a step's gradients are accumulated.

    ``parts``: the step's loss parts (averaged over processes here, so every process takes the
    same decision). Returns the row's optimiser fields: ``lr``, ``grad_norm``,
    ``grad_norm/ROLE``, ``grad_clip_coef`` (and ``update_norm/ROLE`` with
    ``logging.param_stats``), or ``{"skipped_nonfinite": 1.0, ...}`` for a skipped step."""
    cfg, ctx = run.cfg, run.ctx
    parts = distributed.mean(parts, ctx)
    diag = diagnostics.grad_norms(run.roles)
    if run.grad_parts is not None:
        diag.update(run.grad_parts.norms())
    grad_norm, coefs = clip_gradients(run.roles, run.params, cfg.optim.grad_clip, cfg.optim.clip)
    bad = nonfinite_part(parts, grad_norm)
    lr = run.optimizer.param_groups[0]["lr"]
    if bad is not None:
        _skip_or_stop(run, step, bad)
        return {"skipped_nonfinite": 1.0, "lr": lr, "skipped_total": float(run.skipped_total)}
    run.skipped = 0
    diag.update(coefs)
    if run.tracker is not None:
        run.tracker.before_step()
    run.optimizer.step()
    if run.tracker is not None:
        diag.update(run.tracker.after_step())
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {**parts, "lr": lr, "grad_norm": grad_norm, **diag}


def _norm(value) -> float:
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)  # FSDP: DTensor


def clip_gradients(
    roles: dict[str, list], params: list, max_norm: float, mode: str = "global"
) -> tuple[float, dict[str, float]]:
    """Clip in place; ``(the global norm before clipping, {"grad_clip_coef...": factor})``.

    ``global``: all parameters together to ``max_norm`` (``grad_clip_coef``: the factor every
    gradient was multiplied by, clip_grad_norm_'s own formula). ``per_role``: each role's
    gradient to ``max_norm`` on its own (``grad_clip_coef/ROLE``). ``max_norm`` 0: no clipping.
    With one role the two are the same (tested)."""
    limit = max_norm or float("inf")
    if mode == "global":
        norm = _norm(torch.nn.utils.clip_grad_norm_(params, limit))
        return norm, {"grad_clip_coef": min(1.0, max_norm / (norm + 1e-6)) if max_norm else 1.0}
    coefs, squares = {}, 0.0
    for role, pairs in roles.items():
        norm = _norm(torch.nn.utils.clip_grad_norm_([p for _, p in pairs], limit))
        squares += norm**2
        coefs[f"grad_clip_coef/{role}"] = min(1.0, max_norm / (norm + 1e-6)) if max_norm else 1.0
    return math.sqrt(squares), coefs


def _skip_or_stop(run: Run, step: int, bad: str) -> None:
    cfg = run.cfg
    if cfg.train.on_nonfinite == "error" or run.skipped >= cfg.train.skip_limit:
        good = checkpoint.latest(run.run_dir)
        raise TrainingDiverged(
            f"training diverged at step {step}: non-finite {bad}"
            + (f" after {run.skipped} skipped steps" if run.skipped else "")
            + f"; last good checkpoint: {good or 'none'}; lower optim.lr"
            + (", or set train.on_nonfinite=skip" if cfg.train.on_nonfinite == "error" else "")
        )
    run.skipped += 1
    run.skipped_total += 1
    run.optimizer.zero_grad(set_to_none=True)
    if run.ctx.main:
        print(f"qstar: step {step}: non-finite {bad}; update skipped", file=sys.stderr)
