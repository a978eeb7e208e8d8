"""KV-cached batch generation that thinks before every emitted token (:func:`generate`), always
or where a gate says, streaming what it thinks (``on_token``). ``QuietStar.generate`` calls it.

Notation: ``B`` rows, ``P`` prompt tokens, ``t`` thought tokens, ``H`` hidden size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from qstar.core import hf
from qstar.core.think import draw_uniforms, mask_meta_logits, sample_from_logits


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
