"""Think: sampling thought tokens, and laying out the teacher-forced thought block.

Notation: ``B`` batch (already repeated ``k`` times where relevant), ``L`` positions,
``t`` sampled thought tokens, ``n`` = ``n_true``, ``V`` vocabulary.

Sampling rule (Zelikman et al. 2024; the authors' hard Gumbel trick at temperature 1 is exactly
categorical sampling): ``softmax(logits / T)`` with ``<start>``/``<end>`` masked out, drawn by
inverse CDF from one uniform number per (row, position, depth). Drawing the uniforms up front
makes the rule reproducible token by token: sequential decoding that uses the same uniform for
the same (row, position, depth) draws the same thought (the parity test relies on it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def mask_meta_logits(logits: torch.Tensor, meta_ids: tuple[int, int]) -> torch.Tensor:
    """Return ``logits`` (..., V) with the meta tokens' logits set to ``-inf`` (out of place)."""
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[list(meta_ids)] = True
    return logits.masked_fill(banned, float("-inf"))


def draw_uniforms(
    shape: tuple[int, ...], generator: torch.Generator | None, device
) -> torch.Tensor:
    """Uniforms in [0, 1) for inverse-CDF sampling, drawn on the CPU for device independence."""
    return torch.rand(shape, generator=generator).to(device)


def sample_from_logits(
    logits: torch.Tensor,
    uniforms: torch.Tensor | None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Draw one token per row.

    Args:
        logits: ``(..., V)``; masked entries are ``-inf``.
        uniforms: ``(...)`` in [0, 1), or ``None`` for greedy (argmax).
    Returns:
        ``(...)`` LongTensor.
    """
    if uniforms is None:
        return logits.argmax(dim=-1)
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    cdf = torch.softmax(scaled, dim=-1).cumsum_(dim=-1)  # (..., V)
    target = (uniforms.to(cdf.dtype) * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target.contiguous(), right=True).squeeze(-1)
    return idx.clamp_(max=logits.shape[-1] - 1)


def thought_block_tokens(
    input_ids: torch.Tensor,
    thoughts: torch.Tensor,
    start_id: int,
    end_id: int,
    n_true: int,
    fill_id: int,
) -> torch.Tensor:
    """Tokens fed after the base pass, depth-major, for teacher-forced recomputation.

    Per position ``i``: ``<start>, c_1..c_t, <end>, x_{i+1}..x_{i+n-1}`` (``t + 1 + n`` tokens);
    true tokens past the end of the sequence are ``fill_id`` (their predictions are masked).

    Args:
        input_ids: ``(B, L)``.
        thoughts: ``(B, L, t)``.
    Returns:
        ``(B, t + 1 + n, L)``.
    """
    B, L = input_ids.shape
    start = torch.full((B, L, 1), start_id, dtype=torch.long, device=input_ids.device)
    end = torch.full_like(start, end_id)
    future = shifted_targets(input_ids, n_true - 1, fill_id)  # (B, L, n-1)
    block = torch.cat([start, thoughts, end, future], dim=-1)  # (B, L, t+1+n)
    return block.transpose(1, 2).contiguous()


def thought_block_at(
    input_ids: torch.Tensor,
    thoughts: torch.Tensor,
    positions: torch.Tensor,
    start_id: int,
    end_id: int,
    n_true: int,
    fill_id: int,
) -> torch.Tensor:
    """:func:`thought_block_tokens` at chosen positions only.

    Args:
        input_ids: ``(Bk, L)``; thoughts: ``(Bk, m, t)``; positions: ``(B, m)`` (rows repeated
            like ``input_ids``).
    Returns:
        ``(Bk, t + 1 + n, m)``.
    """
    Bk, m = thoughts.shape[:2]
    pos = positions.repeat_interleave(Bk // positions.shape[0], dim=0)  # (Bk, m)
    start = torch.full((Bk, m, 1), start_id, dtype=torch.long, device=input_ids.device)
    end = torch.full_like(start, end_id)
    future = shifted_targets(input_ids, n_true - 1, fill_id)  # (Bk, L, n-1)
    future = future.gather(1, pos[..., None].expand(-1, -1, future.shape[-1]))  # (Bk, m, n-1)
    block = torch.cat([start, thoughts, end, future], dim=-1)  # (Bk, m, t+1+n)
    return block.transpose(1, 2).contiguous()


def shifted_targets(input_ids: torch.Tensor, n: int, fill_id: int) -> torch.Tensor:
    """``out[b, i, j] = input_ids[b, i + 1 + j]`` for ``j < n``, ``fill_id`` past the end: ``(B, L, n)``."""
    B, L = input_ids.shape
    padded = torch.cat(
        [input_ids, torch.full((B, n), fill_id, dtype=input_ids.dtype, device=input_ids.device)],
        dim=1,
    )
    idx = (
        torch.arange(L, device=input_ids.device)[:, None]
        + 1
        + torch.arange(n, device=input_ids.device)
    )
    return padded[:, idx]  # (B, L, n)


def shifted_valid(valid: torch.Tensor, n: int) -> torch.Tensor:
    """``out[b, i, j]`` is true iff position ``i`` and target ``i + 1 + j`` are real tokens: ``(B, L, n)``."""
    return shifted_targets(valid.long(), n, 0).bool() & valid[:, :, None]


def sample(
    step: Callable[[torch.Tensor, int], torch.Tensor],
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    first: torch.Tensor,
    t: int,
    uniforms: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """Decode ``t`` thought tokens at every position, depth by depth.

    Args:
        step: ``(tokens (B, L), depth) -> hidden (B, L, H)``: feeds one depth block to the model
            (extending its cache), as :meth:`qstar.QuietStar.thought_pass` does.
        logits_of: ``hidden -> (B, L, V')`` sampling logits over the allowed vocabulary.
        first: ``(B, L)`` the tokens fed at depth 0 (``<start>``).
        uniforms: ``(B, t, L)`` draws for :func:`sample_from_logits`, or ``None`` for greedy.
    Returns:
        ``(B, L, t)`` indices into the allowed vocabulary of ``logits_of``.
    """
    tok, out = first, []
    for d in range(t):
        idx = sample_from_logits(
            logits_of(step(tok, d)), None if uniforms is None else uniforms[:, d], temperature
        )
        out.append(idx)
        tok = idx
    return torch.stack(out, dim=-1)


def lookahead_index(L: int, n: int, device) -> torch.Tensor:
    """``(n, L)``: the position whose base hidden state predicts the same token as lookahead step
    ``j`` after the thought at ``i`` (``i + j``, clamped to the window)."""
    return (
        torch.arange(L, device=device)[None, :] + torch.arange(n, device=device)[:, None]
    ).clamp(max=L - 1)
