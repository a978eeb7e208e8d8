"""What an evaluation run leaves: metric tables, provenance, result files that never overwrite
earlier ones, and the think / no-think comparison table."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qstar.runs.tracking import provenance

if TYPE_CHECKING:
    from qstar.evaluation.backend import QStarLM


def metric_table(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's results (stderr entries dropped)."""
    table = {}
    for task, values in (results.get("results") or {}).items():
        table[task] = {
            k.replace(",none", ""): float(v)
            for k, v in values.items()
            if isinstance(v, int | float)
            and not isinstance(v, bool)
            and "_stderr" not in k
            and k != "sample_len"
        }
    return table


def provenance_block(
    model: str, lm: QStarLM, tasks: list[str], results: dict[str, Any]
) -> dict[str, Any]:
    return provenance(
        {
            "model": model,
            "think": lm.think,
            "quiet_star": lm.qs.config.to_dict(),
            "greedy_thoughts": lm.greedy,
            "seed": lm.seed,
            "tasks": tasks,
            "task_versions": results.get("versions"),
            "lm_eval_version": _lm_eval_version(),
        }
    )


def _lm_eval_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:
        return None


def write_results(output: Path, payload: dict[str, Any]) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = output / f"results_{stamp}.json"
    i = 1
    while path.exists():  # never overwrite earlier results
        path = output / f"results_{stamp}_{i}.json"
        i += 1
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def format_table(runs: dict[str, dict[str, dict[str, float]]]) -> str:
    """``runs``: ``{"think": table, "no-think": table}`` -> a text table with the difference."""
    labels = list(runs)
    tasks = sorted({t for table in runs.values() for t in table})
    head = f"{'task':32} {'metric':14} " + " ".join(f"{lab:>10}" for lab in labels)
    if len(labels) == 2:
        head += f" {'delta':>10}"
    lines = [head, "-" * len(head)]
    for task in tasks:
        metrics = sorted({m for table in runs.values() for m in table.get(task, {})})
        for metric in metrics:
            vals = [runs[lab].get(task, {}).get(metric) for lab in labels]
            row = f"{task:32} {metric:14} " + " ".join(
                f"{v:10.4f}" if v is not None else f"{'-':>10}" for v in vals
            )
            if len(labels) == 2 and None not in vals:
                row += f" {vals[0] - vals[1]:+10.4f}"
            lines.append(row)
    return "\n".join(lines)
