"""Building, saving and loading a :class:`qstar.QuietStar`: the meta tokens added to a model and
initialised from ``---``, and the directory layout ``save_pretrained`` writes (the Hugging Face
model and tokenizer, ``qstar_config.json``, ``qstar_heads.safetensors``). ``QuietStar``'s
``from_base`` / ``from_pretrained`` / ``save_pretrained`` call these."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qstar.config import QuietStarConfig
from qstar.core import hf
from qstar.models.loading import load_model

CONFIG_FILE = "qstar_config.json"
HEADS_FILE = "qstar_heads.safetensors"
BASE_PREFIX = "base_model."
ADAPTER_DIR = "adapter"  # a LoRA run's adapter alone (PEFT's format), beside the merged model  # the wrapped Hugging Face model, saved in its own format


def from_base(cls, model: nn.Module, tokenizer, config: QuietStarConfig | None = None):
    """Add the meta tokens to ``tokenizer`` and ``model``, initialised from ``---``."""
    config = config or QuietStarConfig()
    tokenizer.add_tokens([config.start_token, config.end_token], special_tokens=True)
    emb = model.get_input_embeddings()
    if len(tokenizer) > emb.weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    qs = cls(model, tokenizer, config)
    init_ids = tokenizer.encode(config.meta_init_text, add_special_tokens=False)
    if not init_ids:
        raise ValueError(f"meta_init_text {config.meta_init_text!r} encodes to no tokens")
    init_meta(qs, init_ids[0])
    check_output_head(qs)
    return qs


def from_pretrained(cls, path_or_id, config: QuietStarConfig | None = None, **load_kwargs):
    """Load a saved QuietStar directory, or wrap a base model (hub id, directory, GGUF file)."""
    path = Path(str(path_or_id)).expanduser()
    if (path / CONFIG_FILE).is_file():
        saved = QuietStarConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
        model, tokenizer = load_model(str(path), **load_kwargs)
        qs = cls(model, tokenizer, config or saved)
        load_heads(qs, path / HEADS_FILE)
        return qs
    model, tokenizer = load_model(str(path_or_id), **load_kwargs)
    return from_base(cls, model, tokenizer, config)


def save_pretrained(qs, directory, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the HF model and tokenizer, ``qstar_config.json`` and ``qstar_heads.safetensors``
    (every parameter and buffer outside the base model); ``state_dict``: whole tensors to write
    in place of the module's own (a sharded model)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base_model = qs.base_model
    if state_dict is None:
        state_dict = {k: v.detach() for k, v in qs.state_dict().items()}
        base = None  # the model's own save_pretrained handles tied weights
    else:
        base = {
            k[len(BASE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(BASE_PREFIX)
        }
    if hf.is_peft(base_model):  # LoRA: the merged model, loadable anywhere, and the adapter
        base_model.save_pretrained(directory / ADAPTER_DIR)
        base, base_model = hf.merged_state_dict(base_model), base_model.get_base_model()
    base_model.save_pretrained(directory, state_dict=base)
    qs.tokenizer.save_pretrained(directory)
    heads = {k: v for k, v in state_dict.items() if not k.startswith(BASE_PREFIX)}
    save_file({k: v.contiguous().cpu() for k, v in heads.items()}, str(directory / HEADS_FILE))
    (directory / CONFIG_FILE).write_text(qs.config.to_json() + "\n")
    return directory


def trained_outside_base(qs) -> list[str]:
    """The names of what the model adds to the Hugging Face model (meta tokens, mixing head, an
    adapter or any other head): what ``save_pretrained`` writes to ``qstar_heads.safetensors``."""
    return [k for k in qs.state_dict() if not k.startswith(BASE_PREFIX)]


def load_heads(qs, file: Path) -> None:
    """Restore every trained part outside the base model (:func:`trained_outside_base`)."""
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} is missing: this directory has no saved meta tokens/mixing head"
        )
    state = load_file(str(file))
    wanted = set(trained_outside_base(qs))
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(
            f"{file} has no {', '.join(missing[:3])}: it was saved by a model without these "
            "parts; load it with the config it was saved with"
        )
    unknown = sorted(set(state) - wanted)
    if unknown:
        raise ValueError(
            f"{file} holds {', '.join(unknown[:3])}, which this model does not have; load it "
            "with the config it was saved with"
        )
    qs.load_state_dict(state, strict=False)


@torch.no_grad()
def init_meta(qs, init_id: int) -> None:
    """Both meta tokens start at the embedding of ``init_id`` (the paper: "---", a pause)."""
    emb = qs.base_model.get_input_embeddings().weight
    row = emb[init_id].clone()
    qs.meta_embeddings.copy_(row.expand(2, -1) / qs.config.meta_scale)
    emb[qs.start_id] = row
    emb[qs.end_id] = row
    out = qs.base_model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != emb.data_ptr():
        out.weight[qs.start_id] = out.weight[init_id]
        out.weight[qs.end_id] = out.weight[init_id]


@torch.no_grad()
def check_output_head(qs) -> None:
    """Refuse models whose logits are not ``lm_logits(last_hidden_state)``."""
    ids = torch.tensor([[1, 2, 3]], device=qs.meta_embeddings.device)
    ref = qs.base_model(input_ids=ids).logits
    ours = qs.lm_logits(qs.backbone_pass(ids).last_hidden_state)
    # ours are at least fp32; a bf16 model's own logits are not
    tol = 1e-3 if ref.dtype in (torch.float32, torch.float64) else 5e-2
    if ref.shape != ours.shape or not torch.allclose(ref.to(ours.dtype), ours, atol=tol, rtol=tol):
        raise ValueError(
            f"{type(qs.base_model).__name__}: its logits are not lm_head(last hidden state) "
            "(+ final softcapping); qstar cannot wrap this architecture yet"
        )


def token_id(tokenizer, token: str) -> int:
    """The id of a meta token; a tokenizer without it fails naming the fix."""
    ids = tokenizer.convert_tokens_to_ids([token])
    unk = tokenizer.unk_token_id
    if not ids or ids[0] is None or (unk is not None and ids[0] == unk):
        raise ValueError(f"tokenizer has no token {token!r}; build with QuietStar.from_base")
    return int(ids[0])
