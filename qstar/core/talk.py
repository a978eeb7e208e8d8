"""Talk: the mixing head and the two ways of mixing predictions with and without a thought.

Notation: ``H`` hidden size, ``V`` vocabulary, ``...`` any leading dims (e.g. ``(B, k, L, n)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class MixingHead(nn.Module):
    """``Linear(2H, H), ReLU, Linear(H, H), ReLU, Linear(H, 1)`` on ``[h_base; h_thought]``.

    The last layer is zero-initialised and has no bias (the authors' code), so at step 0 every
    mixing weight is 0 and the model is exactly the base model.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, 1, bias=False),
        )
        nn.init.zeros_(self.net[-1].weight)

    def forward(self, h_base: torch.Tensor, h_thought: torch.Tensor) -> torch.Tensor:
        """``(..., H), (..., H) -> (..., 1)`` raw (unbounded) mixing weight."""
        return self.net(torch.cat([h_base, h_thought], dim=-1))


LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def mix_hidden(
    raw_w: torch.Tensor, h_base: torch.Tensor, h_thought: torch.Tensor, lm_logits: LogitsFn
) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' code: ``logits = lm_head((1 - w) h_base + w h_thought)``, ``w`` unbounded.

    Returns ``(logits (..., V), w (..., 1))``; equal to mixing the two logits, since the LM head
    is linear (up to final softcapping). Computed in fp32 as ``h_base + w (h_thought - h_base)``:
    early in training ``|w| ~ 1e-4``, and in bf16 both ``1 - w`` (= 1) and the thought's share
    of the mixture (far below the spacing of the hidden state's values) round away.
    """
    h_mix, w = mix_hidden_state(raw_w, h_base, h_thought)
    return lm_logits(h_mix), w


def mix_hidden_state(
    raw_w: torch.Tensor, h_base: torch.Tensor, h_thought: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden state :func:`mix_hidden` feeds the LM head: ``(h_mix (..., H) fp32, w)``."""
    acc = torch.promote_types(h_base.dtype, torch.float32)  # fp32 (fp64 stays fp64)
    w, h_base = raw_w.to(acc), h_base.to(acc)
    return h_base + w * (h_thought.to(acc) - h_base), w


def mix_logprob(
    raw_w: torch.Tensor,
    h_base: torch.Tensor,
    h_thought: torch.Tensor,
    lm_logits: LogitsFn,
    weight_is_raw: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's text (Sec. 4.3): interpolate log-probabilities with ``w = sigmoid(raw) in [0, 1]``.

    ``log p = log_softmax((1 - w) log p_base + w log p_thought)`` (renormalised). Note that a
    zero-initialised head starts at ``w = 0.5`` here, not at the base model.
    Returns ``(log-probs (..., V), w (..., 1))``; log-probs are valid logits. With
    ``weight_is_raw=False`` ``raw_w`` is ``w`` already.
    """
    acc = torch.promote_types(h_base.dtype, torch.float32)  # fp32 (fp64 stays fp64)
    w = torch.sigmoid(raw_w.to(acc)) if weight_is_raw else raw_w.to(acc)
    lp_base = torch.log_softmax(lm_logits(h_base).to(acc), dim=-1)
    lp_thought = torch.log_softmax(lm_logits(h_thought).to(acc), dim=-1)
    return torch.log_softmax((1 - w) * lp_base + w * lp_thought, dim=-1), w


MIXERS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "hidden": mix_hidden,
    "logprob": mix_logprob,
}


def get_mixer(name: str):
    try:
        return MIXERS[name]
    except KeyError:
        raise ValueError(f"unknown mixing {name!r}; choose one of {sorted(MIXERS)}") from None
