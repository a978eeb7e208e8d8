"""A moving-average copy of the language model that predicts without thoughts: the reference of
``quiet_star.reward_reference: ema`` (RLP, arXiv 2510.01265: a thought's reward is its
log-likelihood gain over a no-think EMA of the model, so the reference moves slowly and a
thought is not rewarded for the model's own drift)."""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from qstar.core import hf
from qstar.core.head import linear_logprob


def available_memory(device: torch.device) -> int:
    """Bytes free on ``device`` (host memory on CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class EmaReference:
    """``decay``-weighted moving average of ``model``'s weights (a frozen copy, updated after
    each optimiser step) and its log-probabilities of the next tokens."""

    def __init__(self, model: nn.Module, decay: float):
        need = sum(p.numel() * p.element_size() for p in model.parameters())
        free = available_memory(next(model.parameters()).device)
        if need > free // 2:
            raise ValueError(
                f"quiet_star.reward_reference=ema keeps a copy of the model ({need / 2**30:.1f} "
                f"GiB) and {free / 2**30:.1f} GiB are free; use reward_reference=current"
            )
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.decay = decay
        self._pairs = list(zip(self.model.parameters(), model.parameters(), strict=True))

    @torch.no_grad()
    def update(self) -> None:
        for ema, live in self._pairs:
            ema.mul_(self.decay).add_(live.detach().to(ema.dtype), alpha=1 - self.decay)

    @torch.no_grad()
    def logprob(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, L) -> (B, L - 1)`` ``log p_ema(x_{i+1})`` without a thought."""
        h = hf.backbone(self.model)(input_ids=input_ids, attention_mask=attention_mask)
        head = self.model.get_output_embeddings()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return linear_logprob(
            h.last_hidden_state[:, :-1], head.weight, head.bias, input_ids[:, 1:], softcap=cap
        )

    def state(self) -> dict[str, torch.Tensor]:
        """The copy's weights, each tensor once (tied embeddings share one)."""
        out, seen = {}, set()
        for k, v in self.model.state_dict().items():
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                out[f"ema.{k}"] = v
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        missing, _ = self.model.load_state_dict(own, strict=False)
        tied = {k for k, v in self.model.state_dict().items() if k in missing}
        if len(tied) != len(missing):
            raise ValueError(f"the checkpoint's moving-average copy lacks {sorted(missing)[:3]}")
