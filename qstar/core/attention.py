"""The thought attention layout inside Hugging Face models: the kernel registry by the names users
type (``quiet_star.attention``), the choice among them, and the context manager that points a
model's attention at them for one forward.

The layout itself (which key each thought token may see) and the kernels that compute it are pure
math in :mod:`qstar.core.kernels`, re-exported here.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from qstar.core import hf
from qstar.core.kernels import (
    dense_thought_mask,
    einsum_thought_attention,
    flex_thought_attention,
    fused_thought_attention,
    positions_thought_mask,
    thought_allowed,
    thought_block_mask,
)
from qstar.core.positions import positions_attention

ATTN_NAME = "qstar_sparse"


@dataclass(frozen=True)
class ThoughtLayout:
    """How the keys of a thought forward are laid out: ``n_prefix`` base tokens, then blocks."""

    n_prefix: int
    kernel: str = "sparse"  # a KERNELS name: "sparse" picks one by device and model
    positions: torch.Tensor | None = None  # (B, m): thoughts at chosen positions only


_LAYOUT: contextvars.ContextVar[ThoughtLayout | None] = contextvars.ContextVar(
    "qstar_layout", default=None
)

__all__ = [
    "KERNELS",
    "choose_kernel",
    "register",
    "thought_attention",
    "thought_allowed",
    "einsum_thought_attention",
    "fused_thought_attention",
    "flex_thought_attention",
    "thought_block_mask",
    "dense_thought_mask",
    "positions_thought_mask",
]


# ---------------------------------------------------------------------------- HF integration
def choose_kernel(
    name: str,
    on_cuda: bool,
    sliding_window: int | None,
    softcap: float | None,
    dropout: float,
    training: bool,
) -> str:
    """The kernel that runs for ``quiet_star.attention=name``: ``"sparse"`` is FlexAttention on
    CUDA (without dropout), the fused flash kernel on CPU when there is no sliding window,
    softcapping or dropout, and the einsum kernel otherwise; ``"flex"``/``"einsum"`` as named."""
    if name != "sparse":
        return name
    if on_cuda and dropout == 0.0:
        return "flex"
    if (
        not on_cuda
        and sliding_window is None
        and softcap is None
        and (dropout == 0.0 or not training)
    ):
        return "fused"
    return "einsum"


def _run_flex(query, key, value, n_prefix, scaling, sliding_window, softcap, dropout, training):
    return flex_thought_attention(query, key, value, n_prefix, scaling, sliding_window, softcap)


def _run_fused(query, key, value, n_prefix, scaling, sliding_window, softcap, dropout, training):
    return fused_thought_attention(query, key, value, n_prefix, scaling)


def _run_einsum(query, key, value, n_prefix, scaling, sliding_window, softcap, dropout, training):
    return einsum_thought_attention(
        query, key, value, n_prefix, scaling, sliding_window, softcap, dropout, training
    )


# Kernels by the names users type (``quiet_star.attention``; "sparse" chooses among them and
# "dense" is the model's own eager attention over :func:`dense_thought_mask`).
KERNELS = {"flex": _run_flex, "fused": _run_fused, "einsum": _run_einsum}


def _hf_sparse_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """Hugging Face ``AttentionInterface`` entry: reads the layout set by :func:`thought_attention`."""
    layout = _LAYOUT.get()
    if layout is None:
        raise RuntimeError(
            f"attention '{ATTN_NAME}' was called outside qstar.core.attention.thought_attention()"
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    if layout.positions is not None:  # thoughts at chosen positions (quiet_star.think_at)
        out = positions_attention(
            query,
            key,
            value,
            layout.n_prefix,
            layout.positions,
            scaling,
            window,
            softcap,
            dropout,
            module.training,
        )
        return out, None
    name = choose_kernel(layout.kernel, query.is_cuda, window, softcap, dropout, module.training)
    out = KERNELS[name](
        query, key, value, layout.n_prefix, scaling, window, softcap, dropout, module.training
    )
    return out, None


def register() -> None:
    """Register the thought kernels with transformers' attention interface (idempotent)."""
    hf.register_attention(ATTN_NAME, _hf_sparse_attention)


@contextlib.contextmanager
def thought_attention(
    model, n_prefix: int, implementation: str, positions: torch.Tensor | None = None
) -> Iterator[None]:
    """Within this block, ``model``'s attention follows the thought layout.

    ``implementation`` is a :data:`KERNELS` name as users type it in ``quiet_star.attention``:
    ``"sparse"`` (no mask is built; FlexAttention with a block mask on CUDA, elsewhere the fused
    kernel, or the einsum kernel for sliding windows, softcapping or dropout), ``"flex"``,
    ``"einsum"``, or ``"dense"`` (the model's eager attention; the caller passes
    :func:`dense_thought_mask` as ``attention_mask``). The model's previous attention
    implementation is restored on exit. ``positions`` (``(B, m)``): thought blocks of ``m``
    chosen positions instead of all ``n_prefix`` (:func:`qstar.core.positions.positions_attention`,
    whatever the implementation).
    """
    register()
    name = "eager" if implementation == "dense" and positions is None else ATTN_NAME
    layout = ThoughtLayout(n_prefix=n_prefix, kernel=implementation, positions=positions)
    token = _LAYOUT.set(layout)
    try:
        with hf.attention_implementation(model, name):
            yield
    finally:
        _LAYOUT.reset(token)


def dense_mask_for(model_config, L: int, m: int, nq: int, dtype, device):
    """The reference path's additive mask (:func:`dense_thought_mask`) for a model: one tensor,
    or one per layer type for sliding-window models."""
    layer_types = getattr(model_config, "layer_types", None) or []
    window = getattr(model_config, "sliding_window", None)
    if "sliding_attention" in layer_types:
        return {
            "full_attention": dense_thought_mask(L, m, nq, dtype, None, device),
            "sliding_attention": dense_thought_mask(L, m, nq, dtype, window, device),
        }
    return dense_thought_mask(L, m, nq, dtype, window if not layer_types else None, device)
