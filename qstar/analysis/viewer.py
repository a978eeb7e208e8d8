"""What the thought viewer shows (``qstar show``), as plain data: for each position of a text,
the gain of thinking there (NLL of the next token without minus with the model's greedy thought),
that thought, the mixing weight, the top next-token predictions with and without it, ``k``
sampled thoughts with their rewards (the log-likelihood gain of the true next tokens over the
prediction without a thought), and the content control (the gain of a content-free pause
thought: the same passes and mixing head, nothing to think). :mod:`qstar.analysis.viewer_page`
renders it; the same dict, written as JSON, loads in a notebook.

Notation: ``L`` tokens, ``k`` sampled thoughts, ``t`` thought tokens, ``n`` = ``n_true``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qstar.core import inference
from qstar.core.learn import base_lookahead
from qstar.core.model import QuietStar

TOP = 5  # next-token predictions shown per position
FORMAT = 1  # the JSON's layout version


def _decode_each(tok, ids: list[int]) -> list[str]:
    return [tok.decode([i]) for i in ids]


@torch.no_grad()
def _greedy(qs: QuietStar, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Greedy thoughts at every position: log-probabilities with and without them, the top
    predictions of both, the mixing weights."""
    h_base, h_end, raw_w, thoughts = inference.mixed_states(qs, ids, None, True, None, None)
    base = torch.log_softmax(qs.lm_logits(h_base[0]), -1)  # (L, V)
    mixed, w = qs.mix_logits(raw_w[0], h_base[0], h_end[0])
    mixed = torch.log_softmax(mixed.float(), -1)
    _, h_pause, raw_pause, _ = inference.mixed_states(qs, ids, None, True, None, pause_token(qs))
    pause, _ = qs.mix_logits(raw_pause[0], h_base[0], h_pause[0])
    pause = torch.log_softmax(pause.float(), -1)
    return {"base": base, "mixed": mixed, "pause": pause, "w": w[..., 0], "thoughts": thoughts[0]}


def pause_token(qs: QuietStar) -> int:
    """The content-free thought token: the first token of the meta tokens' init text (``---``)."""
    ids = qs.tokenizer.encode(qs.config.meta_init_text, add_special_tokens=False)
    return int(ids[0])


@torch.no_grad()
def _sampled(qs: QuietStar, ids: torch.Tensor, k: int, seed: int) -> dict[str, torch.Tensor]:
    """``k`` sampled thoughts at every position and their rewards: the lookahead tokens'
    log-likelihood with the thought, less without one."""
    with qs.using(n_thoughts=k):
        out = qs(ids, generator=torch.Generator().manual_seed(seed))
    valid = out.target_valid.to(out.lookahead_logprob.dtype)  # (1, 1, L, n)
    ll = (out.lookahead_logprob * valid).sum(-1)  # (1, k, L)
    reward = ll - base_lookahead(out, out.base_logprob)
    return {"thoughts": out.thoughts[0], "rewards": reward[0]}  # (k, L, t), (k, L)


def view_data(
    qs: QuietStar, ids: list[int], samples: int = 3, seed: int = 0, source: str = ""
) -> dict[str, Any]:
    """The viewer's data for one text (its token ids)."""
    tok = qs.tokenizer
    was_training = qs.training
    qs.eval()
    try:
        x = torch.tensor([ids], device=next(qs.parameters()).device)
        g = _greedy(qs, x)
        s = _sampled(qs, x, samples, seed) if samples else None
    finally:
        qs.train(was_training)
    positions = []
    for i in range(len(ids) - 1):
        target = ids[i + 1]
        nll_base = -float(g["base"][i, target])
        nll_thought = -float(g["mixed"][i, target])
        row: dict[str, Any] = {
            "nll_base": round(nll_base, 5),
            "nll_thought": round(nll_thought, 5),
            "gain": round(nll_base - nll_thought, 5),
            "gain_pause": round(nll_base + float(g["pause"][i, target]), 5),
            "weight": round(float(g["w"][i]), 5),
            "thought": tok.decode(g["thoughts"][i].tolist()),
            "top_base": _top(tok, g["base"][i]),
            "top_thought": _top(tok, g["mixed"][i]),
        }
        if s is not None:
            row["samples"] = sorted(
                (
                    {
                        "thought": tok.decode(s["thoughts"][j, i].tolist()),
                        "reward": round(float(s["rewards"][j, i]), 5),
                    }
                    for j in range(samples)
                ),
                key=lambda r: -r["reward"],
            )
        positions.append(row)
    gains = [p["gain"] for p in positions]
    return {
        "format": FORMAT,
        "source": source,
        "model": {
            "thought_len": qs.config.thought_len,
            "n_true": qs.config.n_true,
            "mixing": qs.config.mixing,
            "thinker": qs.config.thinker,
        },
        "tokens": _decode_each(tok, ids),
        "positions": positions,
        "totals": {
            "tokens": len(positions),
            "mean_gain": round(sum(gains) / max(len(gains), 1), 5),
            "helped": sum(g > 0 for g in gains),
            "hurt": sum(g < 0 for g in gains),
        },
    }


def _top(tok, logprobs: torch.Tensor) -> list[list]:
    values, idx = logprobs.topk(TOP)
    return [
        [tok.decode([int(i)]), round(float(v.exp()), 4)] for v, i in zip(values, idx, strict=True)
    ]


def write_json(data: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    return path
