"""A thinker of its own: LoRA weights that only the thought rows use (``quiet_star.thinker: lora``).

The model thinks with trunk + adapter and speaks without a thought through the trunk alone:
every pass that feeds ``<start>``, thought tokens, ``<end>`` or the teacher-forced lookahead
tokens that read a thought runs the adapter; the base pass (the prediction without a thought and
the context every thought attends to) does not (Think-at-Hard, arXiv 2511.08577, activates its
LoRA only on the extra iterations, keeping the first pass the base model). The lookahead rows
use it because they read the thought and make the prediction after it, which is what the
adapter learns to improve.

Why not PEFT's LoRA layers: PEFT switches adapters per call or per *sequence* (mixed adapter
batches), but thinking generation feeds the emitted token and the next ``<start>`` in one pass
(``t + 2`` passes per token instead of ``t + 3``), so the adapter must apply to some *tokens*
of a row and not others. A forward hook on each target ``nn.Linear`` adds
``scale * B A x`` where a row mask says so; the base model's modules, names and saved weights
stay untouched, and the adapter's weights live on :class:`qstar.QuietStar`, saved with the
meta tokens and mixing head.

Notation: ``x (..., in)`` a target layer's input, ``A (r, in)``, ``B (out, r)``; ``scale =
alpha / r``; ``B`` starts at zero, so a new adapter changes nothing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def target_names(spec: str) -> tuple[str, ...]:
    """``"q_proj,v_proj"`` -> ``("q_proj", "v_proj")``."""
    return tuple(t.strip() for t in spec.split(",") if t.strip())


class ThinkerAdapter(nn.Module):
    """LoRA on the ``targets`` linear layers of ``base_model``, active inside :meth:`active`."""

    def __init__(self, base_model: nn.Module, rank: int, alpha: float, targets: str):
        super().__init__()
        wanted = target_names(targets)
        self.scale = alpha / rank
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self._on = False
        self._rows: torch.Tensor | None = None
        found: set[str] = set()
        linear_names: set[str] = set()
        for name, module in base_model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            leaf = name.rsplit(".", 1)[-1]
            linear_names.add(leaf)
            if leaf not in wanted:
                continue
            found.add(leaf)
            key = name.replace(".", "__")
            w = module.weight
            a = torch.empty(rank, module.in_features, dtype=w.dtype, device=w.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default for A
            self.lora_A[key] = nn.Parameter(a)
            self.lora_B[key] = nn.Parameter(
                torch.zeros(module.out_features, rank, dtype=w.dtype, device=w.device)
            )
            module.register_forward_hook(self._hook(key))
        missing = sorted(set(wanted) - found)
        if missing:
            raise ValueError(
                f"quiet_star.thinker_targets: {type(base_model).__name__} has no linear layer "
                f"named {', '.join(missing)}; its linear layers: {', '.join(sorted(linear_names))}"
            )

    def _hook(self, key: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if not self._on:
                return None
            x = args[0]
            a, b = self.lora_A[key], self.lora_B[key]
            delta = (x.to(a.dtype) @ a.t()) @ b.t() * self.scale  # (..., out)
            if self._rows is not None:  # (B, n): which tokens of the pass are thought rows
                delta = delta * self._rows[..., None].to(delta.dtype)
            return out + delta.to(out.dtype)

        return hook

    @contextlib.contextmanager
    def active(self, rows: torch.Tensor | None = None) -> Iterator[None]:
        """Apply the adapter within this block: to every token, or where ``rows`` (``(B, n)``
        bool, the pass's tokens) is true."""
        previous = self._on, self._rows
        self._on, self._rows = True, rows
        try:
            yield
        finally:
            self._on, self._rows = previous


@contextlib.contextmanager
def detached_parameters(module: nn.Module) -> Iterator[None]:
    """Within this block ``module``'s parameters are detached views: what is computed reads
    the same values but sends no gradient to them (``quiet_star.trunk_grad: lm_only``: the
    thinking terms reach the meta tokens, the mixing head and an adapter, never the weights that
    make the prediction without a thought). Restored on exit."""
    saved = []
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                saved.append((sub, name, p))
                sub._parameters[name] = p.detach()
    try:
        yield
    finally:
        for sub, name, p in saved:
            sub._parameters[name] = p
