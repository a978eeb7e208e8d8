"""Inference entry points of :class:`qstar.QuietStar` beyond the training forward: mixed logits at
chosen positions (evaluation) and KV-cached generation that thinks before every token.

Notation: ``B`` sequences, ``L`` positions, ``m`` chosen positions per row, ``t`` thought tokens,
``H`` hidden size, ``V`` vocabulary. The methods of the same names on ``QuietStar`` call these.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from qstar.core import hf, think
from qstar.core.attention import positions_thought_mask, thought_attention
from qstar.core.think import draw_uniforms, mask_meta_logits, sample_from_logits


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


@torch.no_grad()
def generate(
    qs,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    think: bool = True,
    greedy_thoughts: bool = True,
    do_sample: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    copies: torch.Tensor | int | None = None,
    prefix: torch.Tensor | None = None,
    think_threshold: float | None = None,
    stats: dict | None = None,
    on_token: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """KV-cached batch generation that thinks before every emitted token.

    ``prefix`` (``(P0,)`` token ids): a prompt start shared by every row (few-shot worked
    examples), run once and its cache repeated for the batch; ``input_ids`` then hold each
    row's rest, left-padded, and the padding sits between the prefix and the rest (masked).

    ``copies`` (an int, or ``(B,)`` counts): generate that many continuations of each prompt
    row from one prefill (sampled answers to one question share the prompt's pass and cache);
    the result then has ``sum(copies)`` rows, each prompt's copies together.

    ``input_ids`` may be left-padded (``attention_mask`` zeros first). Before each new token
    the model decodes ``<start> c_1..c_t <end>`` after the last position on a scratch copy of
    the cache (``t + 2`` passes, then the cache is cut back), mixes the base and post-thought
    predictions, and emits a token; the emitted token enters the cache in one pass with the
    next ``<start>``, so an emitted token costs ``t + 2`` passes against plain decoding's one. ``stop(tokens (B, n)) -> (B,)`` bool marks
    finished rows; generation ends when all are finished. Returns ``(B, n)`` new tokens.

    ``think_threshold``, ``stats``: think only where a gate says (:func:`_gated_generate`).
    ``on_token``: called after each emitted token with ``{"tokens": (B,), "thoughts": (B, t)
    or None, "weights": (B,) or None}`` (the thought before it and its mixing weight; ``-1``
    tokens where a row did not think), for streaming.
    """
    run = _gated_generate if think and think_threshold is not None else _generate_every
    return run(
        qs,
        input_ids,
        attention_mask,
        max_new_tokens,
        greedy_thoughts,
        do_sample,
        temperature,
        generator,
        stop,
        copies,
        prefix,
        think_threshold,
        stats,
        think,
        on_token,
    )


def _generate_every(
    qs,
    input_ids,
    attention_mask,
    max_new_tokens,
    greedy_thoughts,
    do_sample,
    temperature,
    generator,
    stop,
    copies,
    prefix,
    think_threshold,
    stats,
    think,
    on_token,
) -> torch.Tensor:
    """:func:`generate` thinking before every token (or never, without ``think``)."""
    device = input_ids.device
    cache, h_last, next_pos, mask = _prefill(qs, input_ids, attention_mask, prefix, copies)
    B = h_last.shape[0]
    ones = torch.ones((B, 1), dtype=mask.dtype, device=device)
    emitted = torch.empty((B, 0), dtype=torch.long, device=device)
    next_thought_token = functools.partial(
        _thought_token, qs, B, greedy_thoughts, generator, device
    )
    start = torch.full((B, 1), qs.start_id, dtype=torch.long, device=device)
    end = torch.full((B,), qs.end_id, dtype=torch.long, device=device)
    pending = None  # thinking: the last emitted token, fed in one pass with the next <start>
    for _ in range(max_new_tokens):
        if think:
            if pending is None:
                m = torch.cat([mask, ones], dim=1)
                with qs.thinking():
                    h = _feed(qs, cache, start, m, next_pos[:, None])[:, -1]
            else:  # x_new and <start> together: t + 2 passes per emitted token, not t + 3
                mask = torch.cat([mask, ones], dim=1)
                m = torch.cat([mask, ones], dim=1)
                fed = torch.cat([pending[:, None], start], dim=1)
                pos = torch.stack([next_pos, next_pos + 1], dim=1)
                with qs.thinking(rows=fed == qs.start_id):  # x_new: text; <start>: a thought
                    hs = _feed(qs, cache, fed, m, pos)
                h_last, h, next_pos = hs[:, 0], hs[:, 1], next_pos + 1
            logits, thought, w = _think_and_mix(
                qs, cache, h, h_last, m, next_pos, ones, end, next_thought_token
            )
        else:
            logits, thought, w = qs.lm_logits(h_last), None, None
        logits = mask_meta_logits(logits, (qs.start_id, qs.end_id))  # text tokens only
        if do_sample:
            u = draw_uniforms((B,), generator, device)
            nxt = sample_from_logits(logits, u, temperature)
        else:
            nxt = logits.argmax(-1)
        emitted = torch.cat([emitted, nxt[:, None]], dim=1)
        if on_token is not None:
            on_token({"tokens": nxt, "thoughts": thought, "weights": w})
        if stop is not None and bool(stop(emitted).all()):
            break
        if think:
            pending = nxt
        else:
            mask = torch.cat([mask, ones], dim=1)
            h_last = _feed(qs, cache, nxt[:, None], mask, next_pos[:, None])[:, -1]
            next_pos = next_pos + 1
    return emitted


def _prefill(qs, input_ids, attention_mask, prefix, copies):
    """:func:`generate`'s prompt pass (after the shared ``prefix``; repeated for ``copies``):
    ``(cache, h_last (B, H), next_pos (B,), mask (B, P'))``."""
    B, P = input_ids.shape
    device = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    cache = hf.new_cache()
    if prefix is not None and prefix.numel():  # the shared start, once for the whole batch
        shared = qs.backbone_pass(prefix[None], cache=cache, use_cache=True)
        cache = hf.repeat_cache(shared.cache, B, detach=False)
        mask = torch.cat(
            [torch.ones((B, prefix.numel()), dtype=mask.dtype, device=device), mask], 1
        )
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, mask.shape[1] - P :]
    out = qs.backbone_pass(
        input_ids,
        attention_mask=mask,
        position_ids=pos,
        cache=cache,
        use_cache=True,
    )
    cache, h_last, next_pos = out.cache, out.last_hidden_state[:, -1], pos[:, -1] + 1
    if copies is not None:  # one prefill, several continuations of each prompt
        if torch.is_tensor(copies):
            copies = copies.to(device)
        cache = hf.repeat_cache(cache, copies, detach=False)
        h_last, next_pos, mask = (
            x.repeat_interleave(copies, dim=0) for x in (h_last, next_pos, mask)
        )
    return cache, h_last, next_pos, mask


def _feed(qs, cache, tokens: torch.Tensor, m: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Feed ``(B, n)`` tokens at positions ``(B, n)`` into ``cache``; ``(B, n, H)`` hidden states."""
    o = qs.backbone_pass(
        tokens,
        attention_mask=m,
        position_ids=p,
        cache=cache,
        use_cache=True,
    )
    return o.last_hidden_state


def _thought_token(qs, B, greedy, generator, device, h: torch.Tensor) -> torch.Tensor:
    """The next thought token of each row after hidden states ``h`` (``(B, H)``)."""
    u = None if greedy else draw_uniforms((B,), generator, device)
    return qs.to_vocab(sample_from_logits(qs.thought_logits(h), u, qs.config.thought_temperature))


def _think_and_mix(qs, cache, h, h_last, m, next_pos, ones, end, next_thought_token):
    """From ``h`` (``(B, H)``, at the ``<start>`` just fed): decode ``c_1..c_t <end>``, cut the
    cache back to the context and mix with the base state ``h_last``: ``(next-token logits,
    the thought's tokens (B, t), the mixing weight (B,))``."""
    t = qs.config.thought_len
    base_len = hf.cache_length(cache) - 1  # the context without <start>
    tok = next_thought_token(h) if t > 0 else end
    thought = []
    for d in range(1, t + 2):  # c_1..c_t, <end> (<start> was d = 0)
        if d <= t:
            thought.append(tok)
        m = torch.cat([m, ones], dim=1)
        with qs.thinking():
            h = _feed(qs, cache, tok[:, None], m, (next_pos + d)[:, None])[:, -1]
        tok = next_thought_token(h) if d < t else end
    hf.crop_cache(cache, base_len)
    logits, w = qs.mix_logits(qs.mixing_head(h_last, h), h_last, h)
    return logits, torch.stack(thought, dim=1) if thought else None, w[..., 0]


def _gated_generate(
    qs,
    input_ids,
    attention_mask,
    max_new_tokens,
    greedy_thoughts,
    do_sample,
    temperature,
    generator,
    stop,
    copies,
    prefix,
    threshold,
    stats,
    think=True,
    on_token=None,
) -> torch.Tensor:
    """:func:`generate` thinking only where the gate says: before a token only where the gate's
    predicted gain at the last position (``quiet_star.gate``) is at least ``threshold``; the
    emitted token is then fed alone (one pass) and a thinking row pays ``t + 3`` passes, the
    others one; a step where no row thinks is a plain step. ``stats`` (a dict) receives
    ``positions`` and ``thought`` (how many emitted tokens of all rows followed a thought)."""
    if qs.gate_head is None:
        raise ValueError(
            "think_threshold needs a model with a trained gate (quiet_star.gate=true); this "
            "model has none"
        )
    device = input_ids.device
    cache, h_last, next_pos, mask = _prefill(qs, input_ids, attention_mask, prefix, copies)
    B = h_last.shape[0]
    ones = torch.ones((B, 1), dtype=mask.dtype, device=device)
    emitted = torch.empty((B, 0), dtype=torch.long, device=device)
    next_thought_token = functools.partial(
        _thought_token, qs, B, greedy_thoughts, generator, device
    )
    start = torch.full((B, 1), qs.start_id, dtype=torch.long, device=device)
    end = torch.full((B,), qs.end_id, dtype=torch.long, device=device)
    counts = {"positions": 0, "thought": 0}
    for _ in range(max_new_tokens):
        logits = qs.lm_logits(h_last)
        thinking = qs.gate_head(h_last) >= threshold  # (B,)
        counts["positions"] += B
        counts["thought"] += int(thinking.sum())
        if bool(thinking.any()):
            m = torch.cat([mask, ones], dim=1)
            with qs.thinking():
                h = _feed(qs, cache, start, m, next_pos[:, None])[:, -1]
            mixed, thought, w = _think_and_mix(
                qs, cache, h, h_last, m, next_pos, ones, end, next_thought_token
            )
            logits = torch.where(thinking[:, None], mixed, logits)
            thought = torch.where(thinking[:, None], thought, -1)  # -1: no thought here
            w = torch.where(thinking, w, 0.0)
        else:
            thought, w = None, None
        logits = mask_meta_logits(logits, (qs.start_id, qs.end_id))
        if do_sample:
            nxt = sample_from_logits(logits, draw_uniforms((B,), generator, device), temperature)
        else:
            nxt = logits.argmax(-1)
        emitted = torch.cat([emitted, nxt[:, None]], dim=1)
        if on_token is not None:
            on_token({"tokens": nxt, "thoughts": thought, "weights": w})
        if stop is not None and bool(stop(emitted).all()):
            break
        mask = torch.cat([mask, ones], dim=1)
        h_last = _feed(qs, cache, nxt[:, None], mask, next_pos[:, None])[:, -1]
        next_pos = next_pos + 1
    if stats is not None:
        stats.update(counts)
    return emitted
