"""lm-evaluation-harness: the ``qstar`` model backend and runs (``backend``), task lookup (``lookup``), result
files and tables (``results``) and
the paper-protocol tasks (``tasks/``). Importing this package registers the backend."""

from qstar.evaluation.backend import QStarLM, evaluate, resolve_model_path
from qstar.evaluation.lookup import TaskError, resolve_tasks
from qstar.evaluation.results import metric_table

__all__ = [
    "QStarLM",
    "TaskError",
    "evaluate",
    "metric_table",
    "resolve_model_path",
    "resolve_tasks",
]
