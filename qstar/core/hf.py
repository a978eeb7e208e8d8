"""The one module that touches Hugging Face transformers internals.

A transformers upgrade that moves its KV-cache layout, attention registry or layer classes
should break here and nowhere else: KV caches (``DynamicCache`` and its ``layers``), the
attention-implementation switch (``config._attn_implementation``) and registry
(``AttentionInterface``), decoder-layer discovery (``_no_split_modules``,
``GradientCheckpointingLayer``) and Gemma's in-embedding scale (``embed_scale``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn
from transformers.cache_utils import DynamicCache

Cache = DynamicCache


def new_cache() -> DynamicCache:
    return DynamicCache()


def repeat_cache(cache: DynamicCache, k, detach: bool) -> DynamicCache:
    """A new cache with every row repeated ``k`` times (``repeat_interleave`` order; ``k`` an int
    or a tensor of counts per row)."""
    data = []
    for layer in cache.layers:
        key, value = layer.keys, layer.values
        if detach:
            key, value = key.detach(), value.detach()
        data.append((key.repeat_interleave(k, dim=0), value.repeat_interleave(k, dim=0)))
    return DynamicCache(ddp_cache_data=data)


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Cut every layer of ``cache`` back to its first ``length`` positions, in place."""
    for layer in cache.layers:
        layer.keys = layer.keys[..., :length, :]
        layer.values = layer.values[..., :length, :]


def backbone(model: nn.Module) -> nn.Module:
    """The transformer of a causal LM without its LM head (``LlamaModel``, ``GPT2Model``...),
    also when PEFT wraps the model (``PeftModel.base_model`` is a tuner whose ``model`` is the
    causal LM)."""
    inner = model
    while hasattr(inner, "peft_config") and hasattr(inner, "base_model"):  # PeftModel, tuners
        inner = inner.base_model.model if hasattr(inner.base_model, "model") else inner.base_model
    return inner.base_model


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped by PEFT (``train.trainable: lora``)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def add_lora(model: nn.Module, rank: int, alpha: float, targets: str) -> nn.Module:
    """``model`` wrapped by PEFT's LoRA on ``targets`` (comma-separated linear-layer names, or
    ``all-linear``): base weights frozen, adapters zero-initialised (``B = 0``) in fp32."""
    import peft  # optional: only LoRA runs need it

    names = "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if names != "all-linear" and not set(names) <= linear:
        missing = ", ".join(sorted(set(names) - linear))
        raise ValueError(
            f"train.lora_targets: {type(model).__name__} has no linear layer named {missing}; "
            f"its linear layers: {', '.join(sorted(linear))} (or all-linear)"
        )
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0, bias="none"
    )
    return peft.get_peft_model(model, config, autocast_adapter_dtype=True)


def merged_state_dict(model: nn.Module) -> dict:
    """A PEFT-wrapped model's weights with every LoRA update merged in, keyed as the plain
    model's own state dict (what ``merge_and_unload`` would give, without changing ``model``)."""
    from peft.tuners.lora import LoraLayer  # optional: only LoRA runs need it

    inner = model.get_base_model()
    merged = {}
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer):
            w = module.get_base_layer().weight.detach()
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
            merged[f"{name}.weight"] = (w.float() + delta.float()).to(w.dtype)
    out = {}
    for key, value in inner.state_dict().items():
        if "lora_" in key:
            continue
        plain = key.replace(".base_layer", "")
        out[plain] = merged.get(plain, value.detach())
    return out


def embedding_scale(embedding: nn.Module) -> float:
    """The factor an embedding layer multiplies its output by (Gemma scales inside it)."""
    return getattr(embedding, "embed_scale", 1.0)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (its ``_no_split_modules`` classes)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = getattr(model, "base_model", model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    return layers or [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]


_REGISTERED: set[str] = set()


def register_attention(name: str, fn: Callable) -> None:
    """Register an attention function under ``name`` with transformers (idempotent)."""
    if name in _REGISTERED:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn)
    _REGISTERED.add(name)


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Within this block ``model`` runs attention ``name``; the previous one is restored."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


__all__ = [
    "Cache",
    "add_lora",
    "backbone",
    "is_peft",
    "merged_state_dict",
    "attention_implementation",
    "cache_length",
    "crop_cache",
    "decoder_layers",
    "embedding_scale",
    "new_cache",
    "register_attention",
    "repeat_cache",
]
