"""Failures of a run (as opposed to bad input): the CLI prints their one-line message and exits 1.

Bad input -- a config key, a data row, a model path, a task file -- raises ``ValueError`` /
:class:`qstar.data.DataError` / :class:`qstar.models.loading.ModelLoadError` instead (exit 2).
"""

from __future__ import annotations


class RunFailed(RuntimeError):
    """A run that started and could not finish; the message is one line naming what and where."""


class TrainingDiverged(RunFailed):
    """A loss part, the gradient norm or the weights went non-finite."""


class WriteFailed(RunFailed):
    """A checkpoint, metrics or result file could not be written (disk full, permissions)."""


def write_failed(path, exc: BaseException, keep: str = "") -> WriteFailed:
    """``WriteFailed`` naming ``path`` and the cause in one line (``keep``: what is still intact)."""
    reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return WriteFailed(f"cannot write {path}: {reason}" + (f"; {keep}" if keep else ""))


def is_write_error(exc: BaseException) -> bool:
    """An OSError, or a library's wrapping of one (safetensors, torch.save's stream writer)."""
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    # torch.save on a full disk: "basic_ios::clear: iostream error", then, from its zip writer,
    # "[enforce fail at inline_container.cc:...] . unexpected pos N vs M" (seen on this machine)
    markers = ("write", "no space", "iostream error", "unexpected pos", "inline_container")
    return type(exc).__name__ == "SafetensorError" or (
        isinstance(exc, RuntimeError) and any(m in text.lower() for m in markers)
    )
