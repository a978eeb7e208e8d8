"""Several processes per training run: ``torchrun`` (or Ray Train, inside a sweep trial) sets
the environment, qstar joins the process group and wraps the model. One process per device;
gloo on CPU, NCCL on CUDA.

``train.parallel=ddp`` replicates the model (DistributedDataParallel); ``train.parallel=fsdp``
shards parameters, gradients and optimiser state over the processes (FSDP2 ``fully_shard``, one
unit per decoder layer plus the root for embeddings, LM head, meta tokens and mixing head), for
models that do not fit one device. Under FSDP the model is built in host memory and each
layer moves to the device as it is sharded; every process takes part in evaluation (through
QuietStar's registered entry points) and in gathering whole weights for checkpoints, which
therefore resume on any number of processes; ``final/`` loads like any other model.

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

from qstar.core import hf


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
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return Context()
    owns = False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():  # this process's GPU, for NCCL and FSDP's default mesh
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=30))
        owns = True
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def device_for(ctx: Context, preferred: torch.device) -> torch.device:
    if ctx.active and preferred.type == "cuda":
        # torchrun shows every GPU; Ray Train may show only this worker's
        return torch.device("cuda", ctx.local_rank % max(1, torch.cuda.device_count()))
    return preferred


def sharded(ctx: Context, strategy: str) -> bool:
    return ctx.active and strategy == "fsdp"


def wrap(
    model: torch.nn.Module, ctx: Context, find_unused: bool, strategy: str = "ddp"
) -> torch.nn.Module:
    """The module to call for training steps: ``model`` itself (one process, or sharded in place
    under FSDP) or a DistributedDataParallel around it. Build the optimiser afterwards."""
    if not ctx.active:
        return model
    if strategy == "fsdp":
        shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.local_rank] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


def shard(qs: torch.nn.Module) -> None:
    """FSDP2 in place: each decoder layer is a unit, the root holds the rest (embeddings, LM head,
    meta tokens, mixing head: what QuietStar reads outside the layers)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    layers = hf.decoder_layers(qs)
    if not layers:
        raise ValueError(
            f"{type(qs.base_model).__name__}: found no decoder layers to shard; use train.parallel=ddp"
        )
    for layer in layers:
        fully_shard(layer)
    fully_shard(qs)
    # QuietStar's inference entry points gather the root's parameters as forward does
    for method in (
        "mixed_logits",
        "base_logits",
        "next_token_logprobs",
        "sample_thoughts",
        "generate",
    ):
        if hasattr(qs, method):
            register_fsdp_forward_method(qs, method)


def full_model_state(model: torch.nn.Module, ctx: Context, strategy: str) -> dict | None:
    """Whole tensors on CPU on the main process (``None`` elsewhere); a collective under FSDP.
    Tied parameters appear once, under the alphabetically first of their names, as
    ``safetensors.save_model`` writes them for an unsharded model (so both files read alike)."""
    if not sharded(ctx, strategy):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not ctx.main:
        return None
    names: dict[int, list[str]] = {}
    for name, param in model.state_dict(keep_vars=True).items():
        if name in full:
            names.setdefault(id(param), []).append(name)
    return {min(group): full[min(group)].contiguous() for group in names.values()}


def full_optimizer_state(model, optimizer, ctx: Context, strategy: str) -> dict | None:
    """The optimiser state keyed by parameter name, whole, on the main process (``None``
    elsewhere, and without FSDP, where the optimiser's own state is whole); a collective."""
    if not sharded(ctx, strategy):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return state if ctx.main else None


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: parameters that never had a gradient (the mixing head under objective=lm) have
    # no Adam state, in the checkpoint as in the optimiser that wrote it
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False)
    )


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


def broadcast(obj: Any, ctx: Context) -> Any:
    """The main process's ``obj``, on every process."""
    if not ctx.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Context) -> None:
    if ctx.active:
        dist.barrier()


def shutdown(ctx: Context) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard_map(fn, items: list[Any], ctx: Context, replicated: bool = True) -> list[Any]:
    """``fn(items)`` (a list in, a list of the same length out), each process doing every
    ``world``-th item and all of them getting the whole result in order. Without
    ``replicated`` (a sharded model, whose every forward is a collective) each process does
    all items itself, in lockstep."""
    if not ctx.active or not replicated:
        return fn(items)
    mine = fn(items[ctx.rank :: ctx.world])
    out: list[Any] = [None] * len(items)
    for rank, part in enumerate(gather(mine, ctx)):
        out[rank :: ctx.world] = part
    return out
