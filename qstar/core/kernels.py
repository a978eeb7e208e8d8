"""The thought attention kernels and masks: pure math over tensors (no model, no transformers);
:mod:`qstar.core.attention` registers them with Hugging Face models under the names users type.

Notation (one sequence; every tensor also has a leading batch dim ``B``):
    L   tokens in the input ``x`` (the "prefix" keys, from the base pass)
    m   thought blocks already in the KV cache, the query blocks included
    nq  query blocks in this call (``nq <= m``); query block ``n`` is thought depth ``g = m - nq + n``
    H / Hkv / G   query heads / key-value heads / ``H // Hkv``

Key layout: ``[x_0 .. x_{L-1} | block 0 (L tokens) | ... | block m-1 (L tokens)]``.
The token of position ``i`` at depth ``g`` (0-based block; its position id is ``i + g + 1``) may
attend to the prefix ``x_0..x_i`` and to the tokens of the *same* position ``i`` in blocks
``0..g`` (Quiet-STaR's "tokenwise parallel sampling", Zelikman et al. 2024, Sec. 4.2). Nothing else.

The authors materialise this as a dense additive ``(L, (m+1)L)`` mask per depth
(:func:`dense_thought_mask`, our reference path). :func:`einsum_thought_attention` computes the
same thing as a causal ``L x L`` prefix part plus a per-position ``m``-wide diagonal part, joined in
one softmax over ``L + m`` scores: O(L^2 + L m) per block instead of O(L^2 m).
:func:`fused_thought_attention` (the CPU default) runs the prefix part in PyTorch's fused flash
kernel and joins the parts through their log-sum-exps, so no ``L x L`` scores are kept;
:func:`flex_thought_attention` (the CUDA default) uses FlexAttention with a block mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _apply_softcap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    if softcap is None:
        return scores
    return torch.tanh(scores / softcap) * softcap


def thought_allowed(
    n_prefix: int, m: int, nq: int, sliding_window: int | None = None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks of the two parts for query blocks ``m-nq .. m-1``.

    Returns:
        prefix: ``(nq, L, L)`` -- query ``(n, i)`` may see prefix key ``j``.
        diag:   ``(nq, m)``    -- query block ``n`` may see block ``g'`` of its own position.
    """
    L = n_prefix
    i = torch.arange(L, device=device)
    depth = torch.arange(m - nq, m, device=device)  # (nq,) 0-based block of each query block
    prefix = (i[None, :, None] >= i[None, None, :]).expand(nq, L, L)  # j <= i
    blocks = torch.arange(m, device=device)
    diag = blocks[None, :] <= depth[:, None]  # g' <= g
    if sliding_window is not None:
        # HF convention: key k visible to query q iff q_pos - k_pos < window.
        qpos = i[None, :, None] + depth[:, None, None] + 1
        prefix = prefix & (qpos - i[None, None, :] < sliding_window)
        diag = diag & (depth[:, None] - blocks[None, :] < sliding_window)
    return prefix, diag


def einsum_thought_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    n_prefix: int,
    scaling: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Thought attention without the dense mask.

    Args:
        query: ``(B, H, nq*L, D)``, the last ``nq`` blocks.
        key, value: ``(B, Hkv, L + m*L, D)``.
    Returns:
        ``(B, nq*L, H, D)`` (the layout Hugging Face attention functions return).
    """
    B, H, Q, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    L = n_prefix
    G = H // Hkv
    nq, m = Q // L, (K - L) // L
    if nq * L != Q or L + m * L != K or nq > m:
        raise ValueError(f"thought layout mismatch: L={L}, queries={Q}, keys={K}")
    query = query.contiguous()
    q = query.view(B, Hkv, G * nq * L, D)
    k_pre, v_pre = key[:, :, :L], value[:, :, :L]  # (B, Hkv, L, D)
    k_blk = key[:, :, L:].view(B, Hkv, m, L, D)
    v_blk = value[:, :, L:].view(B, Hkv, m, L, D)

    s_pre = torch.matmul(q, k_pre.transpose(-1, -2)) * scaling  # (B, Hkv, G*nq*L, L)
    s_pre = s_pre.view(B, Hkv, G, nq, L, L)
    qd = query.view(B, Hkv, G, nq, L, D)
    s_blk = torch.einsum("bkgnid,bkmid->bkgnim", qd, k_blk) * scaling  # (B, Hkv, G, nq, L, m)

    prefix_ok, diag_ok = thought_allowed(L, m, nq, sliding_window, device=query.device)
    scores = torch.cat([s_pre, s_blk], dim=-1).float()  # (B, Hkv, G, nq, L, L+m)
    scores = _apply_softcap(scores, softcap)
    allowed = torch.cat([prefix_ok, diag_ok[:, None, :].expand(nq, L, m)], dim=-1)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    if dropout > 0.0 and training:
        probs = F.dropout(probs, p=dropout, training=True)
    p_pre, p_blk = probs[..., :L], probs[..., L:]
    out = torch.matmul(p_pre.reshape(B, Hkv, G * nq * L, L), v_pre).view(B, Hkv, G, nq, L, D)
    out = out + torch.einsum("bkgnim,bkmid->bkgnid", p_blk, v_blk)
    return out.reshape(B, H, Q, D).transpose(1, 2)  # (B, nq*L, H, D)


def _up(t: torch.Tensor) -> torch.Tensor:
    """At least fp32, for the small parts computed outside the fused kernel."""
    return t if t.dtype == torch.float64 else t.float()


def _fold(query, key, value, L):
    """Queries ``(B, H, nq*L, D)`` -> ``(B, H*nq, L, D)``; prefix keys/values repeated to match."""
    B, H, Q, D = query.shape
    Hkv = key.shape[1]
    nq, G = Q // L, H // Hkv
    qf = query.reshape(B, H * nq, L, D)

    def rep(t):
        return t[:, :, None, :L].expand(B, Hkv, G * nq, L, D).reshape(B, H * nq, L, D)

    return qf, rep(key), rep(value)


def _diag_scores(query, key, L, scaling):
    """``(B, Hkv, G, nq, L, m)`` fp32 scores of each query against its own position's blocks."""
    B, H, Q, D = query.shape
    Hkv = key.shape[1]
    nq, m, G = Q // L, (key.shape[2] - L) // L, H // Hkv
    qd = query.reshape(B, Hkv, G, nq, L, D)
    k_blk = key[:, :, L:].reshape(B, Hkv, m, L, D)
    s = torch.einsum("bkgnid,bkmid->bkgnim", _up(qd), _up(k_blk)) * scaling
    _, diag_ok = thought_allowed(L, m, nq, device=query.device)
    return s.masked_fill(~diag_ok[:, None, :], float("-inf")), qd, k_blk


class _FusedThoughtAttention(torch.autograd.Function):
    """Thought attention with the causal prefix part in PyTorch's fused (flash) CPU kernel.

    Forward: the prefix part gives ``(out_p, lse_p)`` without materialising its ``L x L`` scores;
    the ``m``-wide diagonal part is computed directly; the two are joined through their
    log-sum-exps. Backward: the flash backward run with the *joined* output and log-sum-exp gives
    exactly the prefix part's share of the gradient (its probabilities are
    ``exp(s - lse)``); the diagonal share is the usual softmax backward on the small part. Saves
    O(L D) per query instead of the ``L x (L + m)`` probabilities.
    """

    @staticmethod
    def forward(ctx, query, key, value, L: int, scaling: float):
        B, H, Q, D = query.shape
        Hkv = key.shape[1]
        nq, m, G = Q // L, (key.shape[2] - L) // L, H // Hkv
        qf, kf, vf = _fold(query, key, value, L)
        out_p, lse_p = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qf, kf, vf, 0.0, True, scale=scaling
        )
        s_d, _, _ = _diag_scores(query, key, L, scaling)
        lse_p = lse_p.view(B, Hkv, G, nq, L)
        lse = torch.logaddexp(lse_p, torch.logsumexp(s_d, dim=-1))
        p_d = torch.exp(s_d - lse[..., None])
        v_blk = _up(value[:, :, L:].reshape(B, Hkv, m, L, D))
        out = torch.exp(lse_p - lse)[..., None] * _up(out_p.view(B, Hkv, G, nq, L, D))
        out = (out + torch.einsum("bkgnim,bkmid->bkgnid", p_d, v_blk)).to(query.dtype)
        out = out.reshape(B, H, Q, D)
        ctx.save_for_backward(query, key, value, out, lse.reshape(B, H * nq, L))
        ctx.L, ctx.scaling = L, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        L, scaling = ctx.L, ctx.scaling
        B, H, Q, D = query.shape
        Hkv = key.shape[1]
        nq, m, G = Q // L, (key.shape[2] - L) // L, H // Hkv
        grad_out = grad_out.contiguous()
        qf, kf, vf = _fold(query, key, value, L)
        dq, dk_f, dv_f = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.view(B, H * nq, L, D),
            qf,
            kf,
            vf,
            out.view(B, H * nq, L, D),
            lse,
            0.0,
            True,
            scale=scaling,
        )
        s_d, qd, k_blk = _diag_scores(query, key, L, scaling)
        p_d = torch.exp(s_d - lse.view(B, Hkv, G, nq, L)[..., None])
        do = _up(grad_out.view(B, Hkv, G, nq, L, D))
        delta = (do * _up(out.view(B, Hkv, G, nq, L, D))).sum(-1, keepdim=True)
        v_blk = _up(value[:, :, L:].reshape(B, Hkv, m, L, D))
        dv_blk = torch.einsum("bkgnim,bkgnid->bkmid", p_d, do)
        ds = p_d * (torch.einsum("bkgnid,bkmid->bkgnim", do, v_blk) - delta) * scaling
        dq = _up(dq.view(B, Hkv, G, nq, L, D)) + torch.einsum(
            "bkgnim,bkmid->bkgnid", ds, _up(k_blk)
        )
        dk_blk = torch.einsum("bkgnim,bkgnid->bkmid", ds, _up(qd))
        dk_pre = dk_f.view(B, Hkv, G * nq, L, D).sum(2)
        dv_pre = dv_f.view(B, Hkv, G * nq, L, D).sum(2)
        dkey = torch.cat([_up(dk_pre), dk_blk.reshape(B, Hkv, m * L, D)], dim=2)
        dvalue = torch.cat([_up(dv_pre), dv_blk.reshape(B, Hkv, m * L, D)], dim=2)
        return (
            dq.reshape(B, H, Q, D).to(query.dtype),
            dkey.to(key.dtype),
            dvalue.to(value.dtype),
            None,
            None,
        )


def fused_thought_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, n_prefix: int, scaling: float
) -> torch.Tensor:
    """:func:`einsum_thought_attention` (no sliding window, softcap or dropout) with the prefix part
    in the fused CPU flash kernel: ``(B, H, nq*L, D)`` queries -> ``(B, nq*L, H, D)``."""
    L = n_prefix
    Q, K = query.shape[2], key.shape[2]
    if Q % L or (K - L) % L or Q // L > (K - L) // L:
        raise ValueError(f"thought layout mismatch: L={L}, queries={Q}, keys={K}")
    # The flash op takes one dtype and autocast does not reach inside the Function: under
    # autocast use its dtype (as SDPA would), else the widest of the inputs'.
    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    with torch.autocast(device, enabled=False):
        out = _FusedThoughtAttention.apply(
            query.to(dtype).contiguous(), key.to(dtype), value.to(dtype), n_prefix, scaling
        )
    return out.to(query.dtype).transpose(1, 2)


_BLOCK_MASKS: dict = {}
_FLEX = None


def _flex():
    """``flex_attention``, compiled on CUDA (the eager version is a slow reference)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = (
            torch.compile(flex_attention, dynamic=False)
            if torch.cuda.is_available()
            else flex_attention
        )
    return _FLEX


def thought_block_mask(n_prefix: int, m: int, nq: int, sliding_window: int | None, device):
    """The thought layout as a FlexAttention ``BlockMask`` (cached): causal prefix blocks plus one
    diagonal block per earlier depth, so compute is O(L^2 + L m) per depth block."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (n_prefix, m, nq, sliding_window, str(device))
    if key in _BLOCK_MASKS:
        return _BLOCK_MASKS[key]
    L, first = n_prefix, m - nq
    window = sliding_window if sliding_window is not None else 1 << 30

    def mask_mod(b, h, q_idx, kv_idx):
        qi, g = q_idx % L, q_idx // L + first  # position and 0-based depth of the query
        in_prefix = kv_idx < L
        ki, kg = (kv_idx - L) % L, (kv_idx - L) // L
        prefix_ok = in_prefix & (kv_idx <= qi) & (qi + g + 1 - kv_idx < window)
        diag_ok = (~in_prefix) & (ki == qi) & (kg <= g) & (g - kg < window)
        return prefix_ok | diag_ok

    mask = create_block_mask(
        mask_mod, B=None, H=None, Q_LEN=nq * L, KV_LEN=(m + 1) * L, device=device
    )
    if len(_BLOCK_MASKS) > 64:
        _BLOCK_MASKS.clear()
    _BLOCK_MASKS[key] = mask
    return mask


def flex_thought_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    n_prefix: int,
    scaling: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The same as :func:`einsum_thought_attention` through FlexAttention (fused on CUDA).

    Shapes as there: ``(B, H, nq*L, D)`` queries -> ``(B, nq*L, H, D)``.
    """
    L = n_prefix
    nq, m = query.shape[2] // L, (key.shape[2] - L) // L
    block_mask = thought_block_mask(L, m, nq, sliding_window, query.device)
    score_mod = None
    if softcap is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / softcap) * softcap

    out = _flex()(
        query,
        key,
        value,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2)


def dense_thought_mask(
    n_prefix: int,
    m: int,
    nq: int,
    dtype: torch.dtype,
    sliding_window: int | None = None,
    device=None,
) -> torch.Tensor:
    """The authors' dense additive mask for query blocks ``m-nq..m-1``: ``(1, 1, nq*L, (m+1)*L)``.

    0 where attention is allowed, ``finfo(dtype).min`` elsewhere (a float mask: eager attention
    silently mis-reads boolean 4D masks).
    """
    L = n_prefix
    prefix_ok, diag_ok = thought_allowed(L, m, nq, sliding_window, device=device)
    eye = torch.eye(L, dtype=torch.bool, device=device)
    blocks_ok = diag_ok[:, None, :, None, None] & eye[None, None, None]  # (nq, 1, m, L, L)
    blocks_ok = blocks_ok.expand(nq, 1, m, L, L).permute(0, 3, 2, 1, 4).reshape(nq, L, m * L)
    allowed = torch.cat([prefix_ok, blocks_ok], dim=-1).reshape(nq * L, (m + 1) * L)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def positions_thought_mask(
    positions: torch.Tensor,
    n_prefix: int,
    n_blocks: int,
    dtype: torch.dtype,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Additive mask for thoughts at a few positions only (evaluation): ``(B, 1, m, L + n_blocks*m)``.

    The keys are the ``L`` prefix tokens and ``n_blocks`` blocks of ``m`` thought tokens, one per
    chosen position; the queries are the newest block. The query for position
    ``p = positions[b, r]`` at depth ``g = n_blocks - 1`` (position id ``p + g + 1``) may see
    prefix keys ``j <= p`` and the tokens of its own row ``r`` in every block: the layout of
    :func:`thought_allowed`, restricted to ``m`` positions.

    Args:
        positions: ``(B, m)`` positions in ``[0, L)``.
    """
    B, m = positions.shape
    device = positions.device
    j = torch.arange(n_prefix, device=device)
    prefix_ok = j[None, None, :] <= positions[:, :, None]  # (B, m, L)
    rows = torch.arange(m, device=device)
    own = rows[:, None] == rows[None, :]  # (m, m): query row r sees row r of each block
    blocks_ok = own[None, :, None, :].expand(B, m, n_blocks, m)  # (B, m, n_blocks, m)
    if sliding_window is not None:
        g = n_blocks - 1
        qpos = positions[:, :, None] + g + 1
        prefix_ok = prefix_ok & (qpos - j[None, None, :] < sliding_window)
        depth_gap = g - torch.arange(n_blocks, device=device)  # same position, earlier depth
        blocks_ok = blocks_ok & (depth_gap < sliding_window)[None, None, :, None]
    allowed = torch.cat([prefix_ok, blocks_ok.reshape(B, m, n_blocks * m)], dim=-1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
