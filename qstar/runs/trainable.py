"""Which parameters a run trains: one function every recipe goes through."""

from __future__ import annotations

from torch import nn

from qstar.core import hf

TRAINABLE = ("all", "heads", "lora")


def prepare_trainable(
    qs: nn.Module, mode: str, thinks: bool, lora: tuple[int, float, str] | None = None
) -> list[tuple[str, nn.Parameter]]:
    """Freeze what ``mode`` (``train.trainable``) leaves out and return the trainable
    ``(name, parameter)`` pairs, each parameter once, in the module's order.

    ``all``: everything. ``heads``: the language model (trunk, embeddings, LM head) is frozen;
    the meta tokens and the mixing head train, so thoughts can be learned but the model's own
    predictions cannot change. ``lora``: the language model is frozen and wrapped by PEFT's
    LoRA (``lora``: rank, alpha, target layers), whose adapters train with everything the model
    adds (meta tokens, mixing head, a thinker), all in fp32. ``thinks``: whether the run's
    objective uses thoughts at all (``heads`` without them would train nothing)."""
    check_trainable(mode, thinks)
    if mode == "heads":
        qs.base_model.requires_grad_(False)
        if getattr(qs, "thinker", None) is not None:
            qs.thinker.requires_grad_(False)
    if mode == "lora":
        rank, alpha, targets = lora
        qs.base_model = hf.add_lora(qs.base_model, rank, alpha, targets)
        for name, module in qs.named_children():  # what qstar adds trains in fp32
            if name != "base_model":
                module.float()
        qs.meta_embeddings.data = qs.meta_embeddings.data.float()
    return trainable_parameters(qs)


def check_trainable(mode: str, thinks: bool) -> None:
    """``train.trainable`` against the run's objective, before any work (one line)."""
    if mode not in TRAINABLE:
        raise ValueError(f"train.trainable must be one of {list(TRAINABLE)}, got {mode!r}")
    if mode == "heads" and not thinks:
        raise ValueError(
            "train.trainable=heads freezes the language model, and this run's objective "
            "uses no thoughts, so it would train nothing; use train.trainable=all"
        )


def trainable_parameters(qs: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs that train, each parameter once, in the module's order."""
    seen: set[int] = set()
    out = []
    for name, p in qs.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out
