"""lm-evaluation-harness: the ``qstar`` model backend, task lookup and runs (``backend``) and
the paper-protocol tasks (``tasks/``). Importing this package registers the backend."""

from qstar.evaluation.backend import (
    QStarLM,
    TaskError,
    evaluate,
    metric_table,
    resolve_model_path,
    resolve_tasks,
)

__all__ = [
    "QStarLM",
    "TaskError",
    "evaluate",
    "metric_table",
    "resolve_model_path",
    "resolve_tasks",
]
