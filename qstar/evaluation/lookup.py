"""Task lookup for lm-eval: qstar's tasks, the user's task folders and the stock tasks re-pointed
at local files; task files are checked before a run, with errors naming the file and key."""

from __future__ import annotations

import difflib
import functools
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from qstar.evaluation.tasks import qstar_task_utils
from qstar.overrides import did_you_mean

TASK_DIR = Path(__file__).parent / "tasks"
# Stock lm-eval tasks, unchanged except that their data come from local files.
LOCAL_STOCK = {
    "gsm8k_local": ("gsm8k", "load_gsm8k_local"),
    "commonsense_qa_local": ("commonsense_qa", "load_csqa_local"),
}


class TaskError(ValueError):
    """An unknown task or a broken task file; the message names the task/file and the fix."""


def task_manager(include_paths: list[str] | None = None, data_dir: str | None = None):
    """A TaskManager over qstar's tasks, ``include_paths`` and ``$QSTAR_TASK_PATH`` (cached)."""
    extra = [p for p in os.environ.get("QSTAR_TASK_PATH", "").split(os.pathsep) if p]
    paths = [str(TASK_DIR), *[str(Path(p).expanduser()) for p in [*(include_paths or []), *extra]]]
    for p in paths[1:]:
        if not Path(p).is_dir():
            raise TaskError(f"--include-path {p} is not a directory")
    return _task_manager(tuple(paths), data_dir), paths


@functools.lru_cache(maxsize=8)
def _task_manager(paths: tuple[str, ...], data_dir: str | None):
    from lm_eval.tasks import TaskManager  # indexing every lm-eval task takes seconds: cache it

    return TaskManager(
        include_path=list(paths), metadata={"data_dir": data_dir} if data_dir else None
    )


def check_task_file(path: Path) -> None:
    """Load a task YAML and check its keys; raise :class:`TaskError` naming the file and key."""
    from lm_eval.api.task import TaskConfig
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(path)
    except Exception as exc:
        raise TaskError(
            f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if not isinstance(cfg, dict):
        raise TaskError(f"{path}: a task file must be a mapping")
    if "task" not in cfg and "group" not in cfg:
        raise TaskError(f"{path}: missing key 'task' (the task's name)")
    known = {f.name for f in fields(TaskConfig)} | {
        "include",
        "group",
        "tag",
        "task_alias",
        "group_alias",
    }
    for key in cfg:
        if key not in known:
            raise TaskError(f"{path}: unknown task key {key!r}{did_you_mean(key, known)}")


def resolve_tasks(
    names: list[str], include_paths: list[str] | None = None, data_dir: str | None = None
):
    """``(task specs for simple_evaluate, TaskManager)``; unknown names list close matches."""
    from lm_eval.tasks._yaml_loader import load_yaml

    tm, searched = task_manager(include_paths, data_dir)
    known = set(tm.all_tasks) | set(LOCAL_STOCK)
    specs: list[Any] = []
    for name in names:
        if name in LOCAL_STOCK:
            stock, loader = LOCAL_STOCK[name]
            entry = tm.task_index[stock]
            cfg = dict(
                load_yaml(entry["yaml_path"] if isinstance(entry, dict) else entry.yaml_path)
            )
            cfg.update(task=name, custom_dataset=getattr(qstar_task_utils, loader))
            cfg.pop("dataset_path", None)
            cfg.pop("dataset_name", None)
            cfg["metadata"] = {
                **(cfg.get("metadata") or {}),
                **({"data_dir": data_dir} if data_dir else {}),
            }
            specs.append(cfg)
            continue
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.5)
            raise TaskError(
                f"unknown task {name!r}"
                + (f"; close matches: {', '.join(close)}" if close else "")
                + f"; include paths searched: {', '.join(searched)}"
            )
        entry = tm.task_index.get(name)
        yaml_path = (
            entry.get("yaml_path") if isinstance(entry, dict) else getattr(entry, "yaml_path", None)
        )
        if isinstance(yaml_path, str | Path) and any(
            Path(yaml_path).resolve().is_relative_to(Path(p).resolve()) for p in searched
        ):
            check_task_file(Path(yaml_path))  # ours and the user's; lm-eval's own are trusted
        specs.append(name)
    return specs, tm
