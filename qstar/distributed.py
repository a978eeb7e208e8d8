"""Data parallelism for training runs: ``torchrun`` (or Ray Train) sets the environment, qstar
joins the process group and wraps the model. One process per device; gloo on CPU, NCCL on CUDA.

Launch outside a sweep: ``torchrun --nproc_per_node=N -m qstar.cli train CONFIG ...``.
``train.batch_size`` stays the global batch: each optimiser step takes ``batch_size``
sequences in all, ``micro_batch_size`` per process per forward.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group and must destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init() -> Context:
    """Join the process group that ``torchrun``/Ray Train describe in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=30))
        owns = True
    return Context(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns
    )


def device_for(ctx: Context, preferred: torch.device) -> torch.device:
    if ctx.active and preferred.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return preferred


def wrap(model: torch.nn.Module, ctx: Context, find_unused: bool) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when there are several processes."""
    if not ctx.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.local_rank] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


def mean(values: dict[str, float], ctx: Context) -> dict[str, float]:
    """Average a dict of floats over processes (same keys on every process)."""
    if not ctx.active or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / ctx.world for k, v in zip(keys, t.tolist(), strict=True)}


def total(value: int, ctx: Context) -> int:
    if not ctx.active:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return int(t.item())


def gather(obj: Any, ctx: Context) -> list[Any]:
    """Every process's ``obj``, in rank order (on every process)."""
    if not ctx.active:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.active:
        dist.barrier()


def shutdown(ctx: Context) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
