"""Atomic, safe checkpoints of a training run.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step_000010/``:
    model.safetensors   the QuietStar module: base model, meta embeddings, mixing head
    optimizer.pt        optimiser and scheduler state (loaded with ``weights_only=True``)
    rng.pt              torch CPU/CUDA RNG states and the thought-sampling generator
    state.json          step, data-stream position, python RNG state, metrics line count
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

LATEST = "latest"


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
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, keep the newest ``keep``."""
    from safetensors.torch import save_model

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:06d}-", dir=root))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
            tmp / "optimizer.pt",
        )
        rng = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
        if rank_generators is not None and len(rank_generators) > 1:
            rng["rank_generators"] = list(
                rank_generators
            )  # one thought-sampling generator per process
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        full_state = dict(state, step=step, python_random=_py_random_state())
        (tmp / "state.json").write_text(json.dumps(full_state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(root / LATEST, final.name + "\n")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or ``None``."""
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    rank: int = 0,
) -> dict[str, Any]:
    """Restore everything ``save`` wrote; return ``state.json``. Tensors load with ``weights_only``.
    Process ``rank`` of a data-parallel run gets its own sampling generator back."""
    from safetensors.torch import load_model

    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); resume with the run's own config"
        )
    opt = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=True, map_location="cpu")
    torch.set_rng_state(rng["torch"])
    per_rank = rng.get("rank_generators")
    generator.set_state(per_rank[rank] if per_rank and rank < len(per_rank) else rng["generator"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((path / "state.json").read_text())
    _set_py_random_state(state["python_random"])
    return state


def _py_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_py_random_state(value: list) -> None:
    version, internal, gauss = value
    random.setstate((version, tuple(internal), gauss))
