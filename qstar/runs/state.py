"""The state of one training run that every recipe has (:class:`Run`); built by
:func:`qstar.runs.session.open_run`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qstar.core.model import QuietStar
from qstar.run_config import RunConfig
from qstar.runs import diagnostics, distributed
from qstar.runs.tracking import MetricsLogger, read_metrics


@dataclass
class Run:
    """The state of one training run that every recipe has (a recipe keeps its own, e.g. its
    data stream or memory, on itself and hands it to checkpoints through ``state_dict``)."""

    cfg: RunConfig
    run_dir: Path
    ctx: distributed.Context
    device: torch.device
    qs: QuietStar
    model: torch.nn.Module  # what a step calls: qs, or a data-parallel wrapper around it
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator  # thought and rationale sampling; one per process
    params: list[torch.nn.Parameter]
    roles: dict[str, list]
    logger: MetricsLogger | None  # the main process's
    autocast: Any
    start: int  # the last step a resumed run had finished (0 for a new run)
    fsdp: bool
    accum: int  # micro-batches per optimiser step and process
    resumed_state: dict[str, Any] | None = None  # the recipe's state in the checkpoint
    tracker: diagnostics.ParamTracker | None = None
    grad_parts: diagnostics.GradParts | None = None
    skipped: int = 0  # consecutive non-finite steps skipped (train.on_nonfinite=skip)
    skipped_total: int = 0
    t_start: float = field(default_factory=time.perf_counter)

    def log(self, row: dict[str, Any]) -> None:
        """Append a metrics row (the main process writes; the others do nothing)."""
        if self.logger is not None:
            self.logger.log(row)

    def rows(self) -> list[dict[str, Any]]:
        """Every row of ``metrics.jsonl`` so far (main process)."""
        path = self.run_dir / "metrics.jsonl"
        return read_metrics(path) if path.is_file() else []
