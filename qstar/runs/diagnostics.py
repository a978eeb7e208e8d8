"""Optimisation diagnostics: where the gradient and the update go, per parameter role.

Roles (:func:`parameter_roles`): ``trunk`` (the transformer's layers and norms), ``embeddings``
(input embeddings and LM head; one matrix when tied), ``meta`` (the two meta-token vectors),
``mixing_head``, ``adapter`` (LoRA weights) and any head a model adds (named by its module). These answer the questions a collapsing run raises: which loss term sets the
direction of the update (``grad_norm/policy/ROLE`` against ``grad_norm/nll/ROLE``), how much of
the mixing head's gradient survives clipping (``grad_norm/mixing_head`` x ``grad_clip_coef``),
how far each role moves per step (``update_norm/ROLE``) and, under pure bf16 parameters, how many
weights move at all (``changed_frac/ROLE``: the fraction of elements that differ from step 0).
"""

from __future__ import annotations

import torch
from torch import nn

ROLES = ("trunk", "embeddings", "meta", "mixing_head", "adapter")
ADAPTER_MARKERS = ("lora_",)  # PEFT's and qstar's adapter parameters carry these in their names


def role_of(name: str, in_base: bool, is_embedding: bool) -> str:
    """The role of parameter ``name`` of a ``QuietStar``: an adapter anywhere; inside the base
    model the input embeddings and LM head, or the trunk; outside it the module it belongs to
    (``meta`` for the meta tokens, ``mixing_head``, or the name of any head added later), so a
    new parameter gets a role of its own without a change here."""
    if any(m in name for m in ADAPTER_MARKERS):
        return "adapter"
    if in_base:
        return "embeddings" if is_embedding else "trunk"
    if name == "meta_embeddings":
        return "meta"
    return name.split(".", 1)[0]


def parameter_roles(qs: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """``{role: [(name, parameter)]}`` over the trainable parameters of a ``QuietStar``
    (:func:`role_of`); the built-in roles first, in :data:`ROLES` order."""
    base = qs.base_model
    emb_ids = {id(base.get_input_embeddings().weight)}
    out_emb = base.get_output_embeddings()
    if out_emb is not None:
        emb_ids |= {id(p) for p in out_emb.parameters()}
    roles: dict[str, list[tuple[str, nn.Parameter]]] = {r: [] for r in ROLES}
    seen: set[int] = set()
    for name, p in qs.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        role = role_of(name, name.startswith("base_model."), id(p) in emb_ids)
        roles.setdefault(role, []).append((name, p))
    return {r: ps for r, ps in roles.items() if ps}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP: DTensor


def _norm(tensors) -> float:
    norms = [torch.linalg.vector_norm(_local(t).float()) for t in tensors if t is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def grad_norms(roles: dict[str, list[tuple[str, nn.Parameter]]]) -> dict[str, float]:
    """``{"grad_norm/ROLE": L2 norm}`` of the accumulated gradients, before clipping."""
    return {f"grad_norm/{r}": _norm(p.grad for _, p in ps) for r, ps in roles.items()}


class GradParts:
    """Splits the gradient into the policy term's part and the rest (the NLL terms).

    Call :meth:`add` with the policy term of each micro-batch *before* its ``backward``; it
    computes that term's gradient with ``torch.autograd.grad`` (one extra backward) and sums it
    over the micro-batches. After the accumulation, :meth:`norms` gives per role the norm of the
    policy part and of ``total - policy``. Costs one more copy of the gradients.
    """

    def __init__(self, roles: dict[str, list[tuple[str, nn.Parameter]]]):
        self.roles = roles
        self.params = [p for ps in roles.values() for _, p in ps]
        self.acc: list[torch.Tensor | None] = [None] * len(self.params)

    def add(self, policy_term: torch.Tensor) -> None:
        grads = torch.autograd.grad(policy_term, self.params, retain_graph=True, allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None:
                self.acc[i] = g.detach() if self.acc[i] is None else self.acc[i] + g.detach()

    def norms(self) -> dict[str, float]:
        out: dict[str, float] = {}
        i = 0
        for role, ps in self.roles.items():
            pol, rest = [], []
            for _, p in ps:
                a = self.acc[i]
                i += 1
                pol.append(a)
                if p.grad is not None:
                    rest.append(p.grad if a is None else p.grad - a)
            out[f"grad_norm/policy/{role}"] = _norm(pol)
            out[f"grad_norm/nll/{role}"] = _norm(rest)
        self.acc = [None] * len(self.params)
        return out


class ParamTracker:
    """Per-role update norms of each optimiser step and the fraction of weights changed since
    the tracker was made (a copy of the parameters at that point, so one model's worth of
    memory twice over)."""

    def __init__(self, roles: dict[str, list[tuple[str, nn.Parameter]]]):
        self.roles = roles
        self.start = {r: [_local(p.detach()).clone() for _, p in ps] for r, ps in roles.items()}
        self.before: dict[str, list[torch.Tensor]] | None = None

    def before_step(self) -> None:
        self.before = {
            r: [_local(p.detach()).clone() for _, p in ps] for r, ps in self.roles.items()
        }

    def after_step(self) -> dict[str, float]:
        """``update_norm/ROLE`` (L2 of the step's change) and ``update_rel/ROLE`` (over the
        parameters' norm)."""
        out: dict[str, float] = {}
        assert self.before is not None, "call before_step() first"
        for r, ps in self.roles.items():
            now = [_local(p.detach()) for _, p in ps]
            out[f"update_norm/{r}"] = _norm(
                a.float() - b.float() for a, b in zip(now, self.before[r], strict=True)
            )
            out[f"update_rel/{r}"] = out[f"update_norm/{r}"] / max(_norm(now), 1e-30)
        self.before = None
        return out

    def changed(self) -> dict[str, float]:
        """``changed_frac/ROLE``: fraction of elements that differ from their starting value."""
        out = {}
        for r, ps in self.roles.items():
            diff = total = 0
            for (_, p), p0 in zip(ps, self.start[r], strict=True):
                diff += int((_local(p.detach()) != p0).sum())
                total += p0.numel()
            out[f"changed_frac/{r}"] = diff / max(total, 1)
        return out
