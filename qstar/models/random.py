"""Tiny random models and an offline tokenizer, for tests and benchmarks (no hub needed)."""

from __future__ import annotations

import functools

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3", "gpt2")

_CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? 48 / 2 = 24. 48 + 24 = 72.",
    "The quick brown fox jumps over the lazy dog --- a pause, then the answer follows.",
    "Q: What is 12 times 7?\nA: 84\nQ: Where would you put a plate after washing it?\nA: (B)",
    "Language models can teach themselves to think before speaking.",
]


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in memory: deterministic, offline, every text encodes."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )


def tiny_config(arch: str, vocab_size: int, **overrides):
    """A small random-weight config of one of :data:`ARCHITECTURES`."""
    from transformers import (
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common)
    elif arch == "mistral":
        cfg = MistralConfig(**common, sliding_window=None)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common)
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(
            **common,
            head_dim=16,
            sliding_window=512,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
        )
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=0,
            eos_token_id=0,
        )
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {list(ARCHITECTURES)}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(
    arch: str = "llama", seed: int = 0, dtype=torch.float32, tokenizer=None, **overrides
):
    """``(model, tokenizer)``: a random ``arch`` model in eval mode with a tiny tokenizer."""
    tokenizer = tokenizer or tiny_tokenizer()
    model = _random_model(tiny_config(arch, len(tokenizer), **overrides), dtype, seed)
    return model.eval(), tokenizer


def _random_model(cfg, dtype, seed: int = 0):
    """A causal LM with seeded random weights from ``cfg`` (SDPA attention)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")


def qwen2_05b(dtype=torch.bfloat16):
    """A random model shaped like Qwen2-0.5B (~494M parameters): the GPU benchmark's model."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return _random_model(cfg, dtype)


def mistral_shaped(size: str, dtype=torch.float32):
    """The benchmark's random Mistral models: ``"tiny"`` or ``"small"`` (vocab 32002)."""
    from transformers import MistralConfig

    dims = {
        "tiny": dict(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=688,
        ),
        "small": dict(
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            intermediate_size=1376,
        ),
    }
    if size == "qwen2-0.5b":
        return qwen2_05b(dtype)
    if size not in dims:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(dims) + ['qwen2-0.5b']}")
    cfg = MistralConfig(
        vocab_size=32002, max_position_embeddings=4096, sliding_window=None, **dims[size]
    )
    return _random_model(cfg, dtype)
