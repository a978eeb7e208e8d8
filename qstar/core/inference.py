"""Inference entry points of :class:`qstar.QuietStar` beyond the training forward: mixed logits at
every or at chosen positions and log-probabilities of the next tokens (evaluation); generation is
:mod:`qstar.core.generation` (re-exported here).

Notation: ``B`` sequences, ``L`` positions, ``m`` chosen positions per row, ``t`` thought tokens,
``H`` hidden size, ``V`` vocabulary. The methods of the same names on ``QuietStar`` call these.
"""

from __future__ import annotations

import torch

from qstar.core import hf, think
from qstar.core.attention import positions_thought_mask, thought_attention


@torch.no_grad()
def mixed_logits(
    qs,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    greedy: bool = True,
    generator: torch.Generator | None = None,
    return_thoughts: bool = False,
    fixed_thought: int | None = None,
):
    """:meth:`qstar.QuietStar.mixed_logits`: next-token logits after thinking at every position,
    ``(B, L) -> (B, L, V)``."""
    h_base, h_end, raw_w, thoughts = mixed_states(
        qs, input_ids, attention_mask, greedy, generator, fixed_thought
    )
    logits, _ = qs.mix_logits(raw_w, h_base, h_end)
    return (logits, thoughts) if return_thoughts else logits


@torch.no_grad()
def next_token_logprobs(
    qs,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    think: bool = True,
    fixed_thought: int | None = None,
) -> torch.Tensor:
    """``log p(x_{i+1})`` at every position, after greedy thoughts (``think``) or from the base
    model: ``(B, L) -> (B, L - 1)`` fp32, the values :func:`mixed_logits` / ``base_logits``
    give for the true tokens, through the fused head (:mod:`qstar.core.head`): no ``(B, L, V)``
    logits or log-softmax copy, one chunk of rows at a time."""
    targets = input_ids[:, 1:]
    if not think:
        qs.check_inputs(input_ids, attention_mask)
        out = qs.backbone_pass(input_ids, attention_mask=attention_mask)
        return qs.token_logprob(out.last_hidden_state[:, :-1], targets, fused=True)
    h_base, h_end, raw_w, _ = mixed_states(qs, input_ids, attention_mask, True, None, fixed_thought)
    lp, _ = qs.mixed_token_logprob(
        qs.config.mixing, raw_w[:, :-1], h_base[:, :-1], h_end[:, :-1], targets, fused=True
    )
    return lp


def mixed_states(qs, input_ids, attention_mask, greedy, generator, fixed_thought):
    """What :func:`mixed_logits` mixes (also what the thought viewer shows): ``h_base``, ``h_end`` ``(B, L, H)``, the raw mixing
    weight ``(B, L, 1)`` and the thoughts ``(B, L, t)``."""
    qs.check_inputs(input_ids, attention_mask)
    B, L = input_ids.shape
    t = qs.config.thought_len
    h_base, cache = qs.base_pass(input_ids, attention_mask)
    if fixed_thought is None:
        thoughts = qs.sample_from_cache(cache, L, B, greedy, generator)
    else:  # feed <start>, c_1..c_{t-1} as the sampling passes would
        thoughts = torch.full(
            (B, L, t), int(fixed_thought), dtype=torch.long, device=input_ids.device
        )
        start = torch.full((B, 1, L), qs.start_id, dtype=torch.long, device=input_ids.device)
        head = torch.cat([start, thoughts[:, :, :-1].transpose(1, 2)], dim=1)  # (B, t, L)
        qs.thought_pass(head, cache, L, first_block=0)
    end = torch.full((B, 1, L), qs.end_id, dtype=torch.long, device=input_ids.device)
    tail = torch.cat([thoughts[:, :, -1][:, None], end], dim=1)  # (B, 2, L): c_t, <end>
    h_end = qs.thought_pass(tail, cache, L, first_block=t)[:, 1]  # (B, L, H)
    return h_base, h_end, qs.mixing_head(h_base, h_end), thoughts


@torch.no_grad()
def mixed_logits_at(
    qs,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    greedy: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:meth:`mixed_logits` at chosen positions only: ``(B, L), (B, m) -> (B, m, V)``.

    A thought at position ``i`` depends on ``x_0..x_i`` alone, so scoring a short answer after
    a long prompt needs thoughts at the answer's positions only: one base pass over the
    sequence, then ``t + 2`` passes of ``m`` tokens per row instead of ``L`` (the dense-mask
    layout of :func:`qstar.core.attention.positions_thought_mask`). Row ``r`` equals row
    ``positions[b, r]`` of :meth:`mixed_logits` (for greedy thoughts; sampled thoughts use
    other draws). ``positions`` must lie inside each row's real tokens.
    """
    qs.check_inputs(input_ids, attention_mask)
    B, L = input_ids.shape
    m = positions.shape[1]
    if positions.shape[0] != B or positions.min() < 0 or positions.max() >= L:
        raise ValueError(f"positions {tuple(positions.shape)} must be (B, m) in [0, {L})")
    t = qs.config.thought_len
    device = input_ids.device
    h_base, cache = qs.base_pass(input_ids, attention_mask)  # (B, L, H)
    h_b = h_base.gather(1, positions[..., None].expand(-1, -1, h_base.shape[-1]))  # (B, m, H)
    uniforms = None if greedy else think.draw_uniforms((B, t, m), generator, device)
    qs.reset_head_cache()
    tok = torch.full((B, m), qs.start_id, dtype=torch.long, device=device)
    for d in range(t + 2):  # feed <start>, c_1..c_t, <end>; block d sits at position p + d + 1
        h = _positions_pass(qs, tok, cache, positions, L, d)  # (B, m, H)
        if d < t:
            u = None if greedy else uniforms[:, d]
            idx = think.sample_from_logits(qs.thought_logits(h), u, qs.config.thought_temperature)
            tok = qs.to_vocab(idx)
        else:
            tok = torch.full_like(tok, qs.end_id)
    raw_w = qs.mixing_head(h_b, h)  # h: the hidden state at <end>
    logits, _ = qs.mix_logits(raw_w, h_b, h)
    return logits


def _positions_pass(
    qs, tokens: torch.Tensor, cache: hf.Cache, positions: torch.Tensor, L: int, d: int
) -> torch.Tensor:
    """Feed block ``d`` of thought tokens at ``positions`` (``(B, m)``); extends ``cache``."""
    cfg = qs.base_model.config
    dtype = qs.meta_embeddings.dtype
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None) or []
    if "sliding_attention" in layer_types:
        mask = {
            "full_attention": positions_thought_mask(positions, L, d + 1, dtype),
            "sliding_attention": positions_thought_mask(positions, L, d + 1, dtype, window),
        }
    else:
        mask = positions_thought_mask(
            positions, L, d + 1, dtype, window if not layer_types else None
        )
    with thought_attention(qs.base_model, L, "dense"), qs.thinking():  # eager, float mask
        out = qs.backbone_pass(
            tokens,
            position_ids=positions + d + 1,
            attention_mask=mask,
            cache=cache,
            use_cache=True,
        )
    return out.last_hidden_state


from qstar.core.generation import generate  # noqa: E402, F401  (re-exported)
