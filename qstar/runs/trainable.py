"""Which parameters a run trains: one function every recipe goes through."""

from __future__ import annotations

from torch import nn

TRAINABLE = ("all", "heads")


def prepare_trainable(qs: nn.Module, mode: str, thinks: bool) -> list[tuple[str, nn.Parameter]]:
    """Freeze what ``mode`` (``train.trainable``) leaves out and return the trainable
    ``(name, parameter)`` pairs, each parameter once, in the module's order.

    ``all``: everything. ``heads``: the language model (trunk, embeddings, LM head) is frozen;
    what the model adds to it trains (meta tokens, mixing head, any new head or adapter), so
    thoughts can be learned but the model's own predictions cannot change. ``thinks``: whether
    the run's objective uses thoughts at all (``heads`` without them would train nothing)."""
    check_trainable(mode, thinks)
    if mode == "heads":
        qs.base_model.requires_grad_(False)
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
