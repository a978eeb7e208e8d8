"""Thinking at chosen positions (``quiet_star.think_at``): which positions of a window think, and
the thought attention layout restricted to them.

Notation: ``B`` rows, ``L`` positions, ``m`` chosen positions per row, ``nb`` thought blocks in
the cache (one per depth), ``nq`` of them queried at once, ``H``/``Hkv`` query/key heads,
``G = H / Hkv``, ``D`` head size.

The layout is the all-positions one (:func:`qstar.core.kernels.thought_allowed`) with the query
columns cut down to the ``m`` chosen positions: the thought token of chosen position ``p`` at
depth ``g`` (position id ``p + g + 1``) sees prefix keys ``j <= p`` and the tokens of its own
column in blocks ``g' <= g``. A thought at ``p`` depends on ``x_0..x_p`` alone, so it is exactly
the thought the all-positions pass computes at ``p`` (tested against sequential decoding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

THINK_AT = ("all", "hardest", "random", "gate")


def n_chosen(length: int, fraction: float) -> int:
    """How many of a window's ``length - 1`` predicting positions think at ``fraction``."""
    return max(1, min(length - 1, round(fraction * (length - 1))))


def choose(
    mode: str,
    fraction: float,
    valid: torch.Tensor,
    base_nll: torch.Tensor | None = None,
    gate_score: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(B, m)`` positions (sorted) that think.

    ``hardest``: the highest no-thought loss of the next token (``base_nll``, ``(B, L-1)``);
    ``random``: uniformly at random (the control of ``hardest`` at the same fraction);
    ``gate``: the highest predicted gain (``gate_score``, ``(B, L)``). Positions without a next
    real token (padding, the last one) are chosen last; those the loss then ignores.

    Args:
        valid: ``(B, L)`` real tokens.
    """
    B, L = valid.shape
    m = n_chosen(L, fraction)
    can = valid[:, 1:] & valid[:, :-1]  # (B, L-1): x_{i+1} exists
    if mode == "hardest":
        score = base_nll.detach().float()
    elif mode == "random":
        score = torch.rand(B, L - 1, generator=generator).to(valid.device)
    elif mode == "gate":
        score = gate_score[:, :-1].detach().float()
    else:
        raise ValueError(f"think_at must be one of {list(THINK_AT[1:])} here, got {mode!r}")
    score = score.masked_fill(~can, float("-inf"))
    return score.topk(m, dim=1).indices.sort(dim=1).values


def gather_columns(x: torch.Tensor, positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` with its position axis ``dim`` (length ``L``) cut to ``positions`` (``(B, m)``;
    ``x``'s first axis is ``B`` or a multiple ``B k`` in ``repeat_interleave`` order)."""
    rows = x.shape[0] // positions.shape[0]
    idx = positions.repeat_interleave(rows, dim=0)  # (Bk, m)
    shape = [idx.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = idx.shape[1]
    idx = idx.view(shape).expand(*[s if i != dim else idx.shape[1] for i, s in enumerate(x.shape)])
    return x.gather(dim, idx)


def positions_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    n_prefix: int,
    positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Thought attention at chosen positions, without a dense mask (the einsum kernel's way).

    Args:
        query: ``(B, H, nq*m, D)``, the last ``nq`` blocks.
        key, value: ``(B, Hkv, L + nb*m, D)``.
        positions: ``(B, m)`` (rows repeated like the batch).
    Returns:
        ``(B, nq*m, H, D)``.
    """
    B, H, Q, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    L, m = n_prefix, positions.shape[1]
    G = H // Hkv
    nq, nb = Q // m, (K - L) // m
    if positions.shape[0] != B:
        positions = positions.repeat_interleave(B // positions.shape[0], dim=0)
    if nq * m != Q or L + nb * m != K or nq > nb:
        raise ValueError(f"thought layout mismatch: L={L}, m={m}, queries={Q}, keys={K}")
    qd = query.contiguous().view(B, Hkv, G, nq, m, D)
    k_pre, v_pre = key[:, :, :L], value[:, :, :L]  # (B, Hkv, L, D)
    k_blk = key[:, :, L:].view(B, Hkv, nb, m, D)
    v_blk = value[:, :, L:].view(B, Hkv, nb, m, D)
    s_pre = torch.einsum("bkgnrd,bkjd->bkgnrj", qd, k_pre) * scaling  # (B, Hkv, G, nq, m, L)
    s_blk = torch.einsum("bkgnrd,bkerd->bkgnre", qd, k_blk) * scaling  # (B, Hkv, G, nq, m, nb)
    j = torch.arange(L, device=query.device)
    depth = torch.arange(nb - nq, nb, device=query.device)  # (nq,) block of each query block
    blocks = torch.arange(nb, device=query.device)
    pre_ok = (j[None, None, None, :] <= positions[:, None, :, None]).expand(B, nq, m, L)
    blk_ok = (blocks[None, :] <= depth[:, None])[None, :, None, :].expand(B, nq, m, nb)
    if sliding_window is not None:
        qpos = positions[:, None, :, None] + depth[None, :, None, None] + 1  # (B, nq, m, 1)
        pre_ok = pre_ok & (qpos - j < sliding_window)
        gap = depth[:, None] - blocks[None, :]  # (nq, nb)
        blk_ok = blk_ok & (gap < sliding_window)[None, :, None, :]
    scores = torch.cat([s_pre, s_blk], dim=-1).float()  # (B, Hkv, G, nq, m, L + nb)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = torch.cat([pre_ok, blk_ok], dim=-1)[:, None, None]  # (B, 1, 1, nq, m, L + nb)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    if dropout > 0.0 and training:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.einsum("bkgnrj,bkjd->bkgnrd", probs[..., :L], v_pre)
    out = out + torch.einsum("bkgnre,bkerd->bkgnrd", probs[..., L:], v_blk)
    return out.reshape(B, H, Q, D).transpose(1, 2)  # (B, nq*m, H, D)


class GateHead(nn.Module):
    """Predicts the gain of thinking at a position from its hidden state without a thought:
    ``(..., H) -> (...)`` nats (``quiet_star.gate``). Trained on the gains a step measures at the
    positions that thought (no extra passes); last layer zero-initialised, so a new gate predicts
    0 everywhere."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden, hidden // 4), nn.ReLU(), nn.Linear(hidden // 4, 1)
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.to(self.net[0].weight.dtype))[..., 0]
