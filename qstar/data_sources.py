"""Where training text comes from: a data source resolved to local files or a hub id.

A source is, in this order: an explicit local path (a file, a directory, a glob) or
``builtin:NAME``; a hub id's file under the data folder (``data.data_dir`` or
``$QSTAR_DATA_DIR``; see :data:`LOCAL_LAYOUT`); the hub, where it is reachable; the bundled
sample (:data:`BUNDLED`). Reading rows and cutting token windows is :mod:`qstar.data`'s, which
re-exports every name here.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import qstar.hub as hub

# hub id, split -> file under the data directory (the layout of the project's offline data)
LOCAL_LAYOUT: dict[tuple[str, str], str] = {
    ("openai/gsm8k", "train"): "gsm8k/train.jsonl",
    ("openai/gsm8k", "test"): "gsm8k/test.jsonl",
    ("tau/commonsense_qa", "train"): "csqa/train_rand_split.jsonl",
    ("tau/commonsense_qa", "validation"): "csqa/dev_rand_split.jsonl",
    ("allenai/c4", "validation"): "c4/c4_validation_2k.parquet",
}
SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
BUILTIN_DIR = Path(__file__).parent / "builtin_data"


class DataError(ValueError):
    """Bad or missing training data; the message names the file (and line) and the fix."""


# hub id, split -> (file in BUILTIN_DIR, description): the last resort on a bare machine
BUNDLED: dict[tuple[str, str], tuple[str, str]] = {
    ("openai/gsm8k", "train"): ("gsm8k_train.jsonl", "300-row GSM8K train sample"),
    ("openai/gsm8k", "test"): ("gsm8k_test.jsonl", "300-row GSM8K test sample"),
    ("tau/commonsense_qa", "validation"): (
        "csqa_validation.jsonl",
        "300-row CommonsenseQA validation sample",
    ),
}


def data_dir(configured: str | None = None) -> Path | None:
    """The local data folder: ``configured`` (``data.data_dir``, ``--data-dir``), else
    ``$QSTAR_DATA_DIR`` -- the one place qstar reads that variable."""
    value = configured or os.environ.get("QSTAR_DATA_DIR")
    return Path(value).expanduser() if value else None


@dataclass(frozen=True)
class Resolved:
    """Where a data source's rows come from.

    ``kind``: ``"files"`` (``where`` is a list of paths) or ``"hub"`` (``where`` is the id);
    ``origin``: ``"path"`` (given explicitly), ``"builtin"``, ``"data_dir"``, ``"hub"`` or
    ``"bundled"``; ``note``: the line to print when the origin is a fallback.
    """

    kind: str
    where: Any
    origin: str
    note: str | None = None

    def describe(self) -> str:
        if self.kind == "hub":
            return f"hub:{self.where}"
        return ", ".join(str(p) for p in self.where)


def resolve(source: str, split: str, configured_dir: str | None = None) -> Resolved:
    """Resolve a data source, in this order: an explicit local path (file, directory, glob) or
    ``builtin:NAME``; a hub id's file under the data folder (:func:`data_dir`,
    :data:`LOCAL_LAYOUT`); the hub, where it is reachable; the bundled sample
    (:data:`BUNDLED`). Raises :class:`DataError` naming the source and the fix."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        path = BUILTIN_DIR / f"{name}.txt"
        if not path.is_file():
            names = sorted(p.stem for p in BUILTIN_DIR.glob("*.txt"))
            raise DataError(f"no built-in text {name!r}; available: {', '.join(names)}")
        return Resolved("files", [path], "builtin")
    path = Path(source).expanduser()
    if path.is_file():
        return Resolved("files", [path], "path")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"directory {source} holds no {'/'.join(SUFFIXES)} files")
        return Resolved("files", files, "path")
    if any(ch in source for ch in "*?["):
        files = sorted(
            Path(p)
            for p in glob.glob(os.path.expanduser(source), recursive=True)
            if Path(p).suffix in SUFFIXES
        )
        if not files:
            raise DataError(f"glob {source} matches no {'/'.join(SUFFIXES)} files")
        return Resolved("files", files, "path")
    if (
        source.startswith((".", "/", "~"))
        or Path(source).suffix in SUFFIXES
        or source.count("/") != 1
    ):
        raise DataError(
            f"data source {source} does not exist (not a file, directory, glob or hub id org/name)"
        )
    local = LOCAL_LAYOUT.get((source, split))
    root = data_dir(configured_dir)
    if local and root is not None and (root / local).is_file():
        return Resolved("files", [root / local], "data_dir")
    if hub.hub_reachable():
        return Resolved("hub", source, "hub")
    bundled = BUNDLED.get((source, split))
    why = "no QSTAR_DATA_DIR" if root is None else f"no {local or 'local copy'} under {root}"
    if bundled is not None:
        file, what = bundled
        return Resolved(
            "files",
            [BUILTIN_DIR / file],
            "bundled",
            f"hub unreachable and {why}: using the bundled {what} ({BUILTIN_DIR / file})",
        )
    raise DataError(
        f"data source {source} (split {split}) is unreachable: the hub cannot be reached and "
        f"{why}; set QSTAR_DATA_DIR (or data.data_dir) to a folder with "
        f"{local or 'a local copy'}, or point data.source at a local file"
    )


def resolve_source(source: str, split: str, configured_dir: str | None = None) -> tuple[str, Any]:
    """``("files", [paths])`` or ``("hub", id)`` (see :func:`resolve`)."""
    r = resolve(source, split, configured_dir)
    return r.kind, r.where
