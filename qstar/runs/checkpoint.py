"""Atomic, safe checkpoints of a training run.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step_000010/``:
    model.safetensors   the QuietStar module: base model, meta embeddings, mixing head
    optimizer.pt        optimiser and scheduler state (loaded with ``weights_only=True``)
    rng.pt              torch CPU/CUDA RNG states and the thought-sampling generator
    state.json          step, the recipe's state (data position, iteration, memory...),
                        python RNG state, metrics line count
    recipe.safetensors  the recipe's own tensors, when it has any
A checkpoint is written into a temporary folder and renamed into place; ``checkpoints/latest``
(a one-line text file, replaced atomically) names the newest complete one. A crash mid-write
leaves at worst a stray temporary folder, never a corrupt latest checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from qstar.errors import is_write_error, write_failed

LATEST = "latest"
TENSORS = "recipe.safetensors"


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    state: dict[str, Any],
    keep: int,
    rank_generators: list[torch.Tensor] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, keep the newest ``keep``.

    ``model_state``/``optimizer_state``: whole tensors gathered from a sharded (FSDP) model, written
    in place of ``model``'s and ``optimizer``'s own state (the optimiser's keyed by parameter name).
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:06d}-", dir=root))
    try:
        if model_state is None:
            save_model(model, str(tmp / "model.safetensors"))
        else:
            save_file(model_state, str(tmp / "model.safetensors"))
        opt = {"scheduler": scheduler.state_dict()}
        if optimizer_state is None:
            opt["optimizer"] = optimizer.state_dict()
        else:
            opt["optimizer_by_name"] = optimizer_state
        torch.save(opt, tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
        if rank_generators is not None and len(rank_generators) > 1:
            rng["rank_generators"] = list(
                rank_generators
            )  # one thought-sampling generator per process
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        if tensors:  # the recipe's own tensors (e.g. a moving-average copy of the model)
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS))
        full_state = dict(state, step=step, python_random=_py_random_state())
        (tmp / "state.json").write_text(json.dumps(full_state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_error(exc):
            raise _failed(final, exc, run_dir) from exc
        raise
    try:
        _atomic_write_text(root / LATEST, final.name + "\n")
    except OSError as exc:
        raise _failed(root / LATEST, exc, run_dir) from exc
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _failed(path: Path, exc: BaseException, run_dir: Path):
    previous = latest(run_dir)
    keep = (
        f"the previous checkpoint {previous} is intact: free space, then --resume"
        if previous is not None
        else "no earlier checkpoint: free space and start again"
    )
    return write_failed(path, exc, keep)


def _by_name(state: dict[str, Any], names: list[str] | None) -> dict[str, Any]:
    """``optimizer.state_dict()`` (parameters by index) -> the layout keyed by parameter name."""
    if names is None:
        raise ValueError("converting an optimiser state needs the parameter names")
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def _by_index(state: dict[str, Any], names: list[str] | None) -> dict[str, Any]:
    """The layout keyed by parameter name -> ``optimizer.state_dict()``."""
    if names is None:
        raise ValueError("converting an optimiser state needs the parameter names")
    index = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: v for n, v in state["state"].items()}, "param_groups": groups}


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or ``None``."""
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Checkpoint ``path``'s weights into an unsharded ``model``. A checkpoint of a LoRA run
    holds only what trains (the frozen base weights come from the model's source): the
    model's frozen parameters may be missing from it, nothing else."""
    file = str(path / "model.safetensors")
    missing, unexpected = load_model(model, file, strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    frozen |= {n for n, _ in model.named_buffers()}
    missing = [m for m in missing if m not in frozen] if frozen else missing
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); resume with the run's own config"
        )


def load(
    path: Path,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    rank: int = 0,
    load_named_optimizer: Any = None,
    param_names: list[str] | None = None,
) -> dict[str, Any]:
    """Restore everything ``save`` wrote; return ``state.json``. Tensors load with ``weights_only``.
    Process ``rank`` of a data-parallel run gets its own sampling generator back.

    ``model=None``: the weights were loaded already (:func:`load_weights`, before sharding).
    ``load_named_optimizer(state)`` restores an optimiser state keyed by parameter name (FSDP).
    ``param_names``: the names of the optimiser's parameters in order, to convert between the two
    layouts (a run checkpointed on one process resumes sharded, and the other way round)."""
    if model is not None:
        load_weights(path, model)
    opt = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    if load_named_optimizer is not None:
        named = opt.get("optimizer_by_name") or _by_name(opt["optimizer"], param_names)
        load_named_optimizer(named)
    else:
        plain = opt.get("optimizer") or _by_index(opt["optimizer_by_name"], param_names)
        optimizer.load_state_dict(plain)
    scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=True, map_location="cpu")
    torch.set_rng_state(rng["torch"])
    per_rank = rng.get("rank_generators")
    generator.set_state(per_rank[rank] if per_rank and rank < len(per_rank) else rng["generator"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((path / "state.json").read_text())
    if (path / TENSORS).is_file():
        state["tensors"] = load_file(str(path / TENSORS))
    _set_py_random_state(state["python_random"])
    return state


def _py_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_py_random_state(value: list) -> None:
    version, internal, gauss = value
    random.setstate((version, tuple(internal), gauss))
