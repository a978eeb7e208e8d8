"""Training text: sources (hub datasets, local files, built-in samples) and token windows.

Sources (resolved in :mod:`qstar.data_sources`, whose names this module re-exports)
  * a hub dataset id, streamed (``open-web-math/open-web-math``, ``allenai/c4`` + ``en``);
    ids with a known local layout are read from a data directory when the file is there
    (``data.data_dir`` or ``$QSTAR_DATA_DIR``; see :data:`LOCAL_LAYOUT`);
  * local ``.jsonl``, ``.json`` (an array, or JSON lines), ``.parquet``, ``.txt`` (one document
    per blank-line-separated block) files, a directory of them, or a glob;
  * ``builtin:NAME``: small texts shipped with qstar for demos and tests;
  * ``arith:A-B``: additions of A to B digits as ``Q: What is 624 + 257?\nA: The answer is
    881.``, generated (:mod:`qstar.qa.arith`; ``max_documents`` of them, split train or test).
Each row becomes one document through ``text_field`` or a ``template`` over fields
(``"{question}\\n{answer}"``). A malformed row raises :class:`DataError` naming the file and
line, or is skipped and counted when ``on_bad_row == "skip"``.

Windows (deterministic for a seed): ``random`` takes one random window of ``L`` tokens per
document per epoch (the paper; shorter documents are right-padded); ``pack`` concatenates
documents with EOS and cuts them into full windows. A stream's position is ``(epoch, index)``,
so resuming needs only those two numbers.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qstar.data_sources import (  # noqa: F401  (re-exported: callers import them from qstar.data)
    ARITH_SPLITS,
    BUILTIN_DIR,
    BUNDLED,
    LOCAL_LAYOUT,
    SUFFIXES,
    DataError,
    Resolved,
    data_dir,
    resolve,
    resolve_source,
)


@dataclass
class Documents:
    texts: list[str]
    source: str
    origin: str = "path"  # see Resolved.origin
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)


_ANNOUNCED: set[str] = set()


def announce(resolved: Resolved) -> None:
    """Print a fallback's one line, once per process."""
    if resolved.note and resolved.note not in _ANNOUNCED:
        _ANNOUNCED.add(resolved.note)
        import sys

        print(f"qstar: {resolved.note}", file=sys.stderr)


# ---------------------------------------------------------------------------- reading rows
def iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(location, row)`` for every row of a local file; a row is a dict, a string or an error."""
    suffix = path.suffix
    if suffix == ".jsonl":
        yield from _json_lines(path)
    elif suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            yield from _json_lines(path)  # JSON lines despite the name (e.g. AQuA)
            return
        rows = data if isinstance(data, list) else [data]
        for i, row in enumerate(rows):
            yield f"{path}:item {i}", row
    elif suffix == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except Exception as exc:
            raise DataError(f"{path}: cannot read parquet ({str(exc).splitlines()[0]})") from None
        for i, row in enumerate(frame.to_dict(orient="records")):
            yield f"{path}:row {i}", row
    elif suffix == ".txt":
        block: list[str] = []
        start = 1
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                if not block:
                    start = lineno
                block.append(line)
            elif block:
                yield f"{path}:{start}", "\n".join(block)
                block = []
        if block:
            yield f"{path}:{start}", "\n".join(block)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use {', '.join(SUFFIXES)}")


def _json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"{path}:{lineno}", DataError(f"invalid JSON ({exc.msg})")


def row_text(row: Any, text_field: str, template: str | None) -> str:
    """One document from a row; raises :class:`DataError` with the problem (no location)."""
    if isinstance(row, DataError):
        raise row
    if isinstance(row, str):
        if template is not None:
            raise DataError("a template needs rows with fields, but this row is plain text")
        return row
    if not isinstance(row, dict):
        raise DataError(f"expected an object with fields, got {type(row).__name__}")
    if template is not None:
        try:
            return template.format_map(row)
        except KeyError as exc:
            raise DataError(
                f"template field {exc.args[0]!r} is missing (row has: {', '.join(row)})"
            ) from None
        except (ValueError, IndexError) as exc:
            raise DataError(f"template {template!r} is invalid: {exc}") from None
    if text_field not in row:
        raise DataError(
            f"text field {text_field!r} is missing (row has: {', '.join(map(str, row))}); "
            "set data.text_field or data.template"
        )
    text = row[text_field]
    if not isinstance(text, str):
        raise DataError(f"text field {text_field!r} is {type(text).__name__}, not a string")
    return text


def load_documents(
    source: str,
    split: str = "train",
    text_field: str = "text",
    template: str | None = None,
    max_documents: int | None = None,
    on_bad_row: str = "error",
    configured_dir: str | None = None,
    hub_config: str | None = None,
    seed: int = 0,
    shuffle_buffer: int = 10000,
) -> Documents:
    """Read documents; raises :class:`DataError` for a bad row (unless skipped) or no documents."""
    resolved = resolve(source, split, configured_dir)
    announce(resolved)
    kind, where = resolved.kind, resolved.where
    docs = Documents(texts=[], source=str(source), origin=resolved.origin)
    if kind == "arith":
        rows = _arith_rows(where, split, max_documents)
    elif kind == "files":
        rows = file_rows(where)
    else:
        rows = _hub_rows(where, hub_config, split, seed, shuffle_buffer)
    for location, row in rows:
        if max_documents is not None and len(docs.texts) >= max_documents:
            break
        try:
            text = row_text(row, text_field, template)
        except DataError as exc:
            if on_bad_row == "skip":
                docs.skipped += 1
                if len(docs.skipped_examples) < 5:
                    docs.skipped_examples.append(f"{location}: {exc}")
                continue
            raise DataError(f"{location}: {exc}; fix the row or set data.on_bad_row=skip") from None
        if text.strip():
            docs.texts.append(text)
    if kind == "files":
        docs.source = ", ".join(str(p) for p in where)
    if not docs.texts:
        raise DataError(
            f"no documents in {docs.source} (split {split!r}, {docs.skipped} bad rows skipped)"
        )
    return docs


def file_rows(paths: list[Path]) -> Iterator[tuple[str, Any]]:
    """``(location, row)`` of every row of ``paths`` in order; an unreadable file is a
    :class:`DataError` naming it."""
    for path in paths:
        try:
            yield from iter_rows(path)
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None


def _arith_rows(source: str, split: str, limit: int | None) -> Iterator[tuple[str, Any]]:
    """The first ``limit`` generated problems of ``source`` (``arith:A-B``) as plain text."""
    from qstar.qa.arith import documents  # deferred: qstar.qa imports qstar.data (import cycle)

    if limit is None:
        raise DataError(f"data source {source} has no end: set data.max_documents")
    for i, text in enumerate(documents(split, source, limit)):
        yield f"{source}[{split}] problem {i}", text


def _hub_rows(name: str, config: str | None, split: str, seed: int, buffer: int):
    try:
        import datasets

        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        stream = stream.shuffle(seed=seed, buffer_size=buffer)
        for i, row in enumerate(stream):
            yield f"{name}[{split}] row {i}", row
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"cannot stream hub dataset {name!r} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "where the hub is unreachable use a local file, or set QSTAR_DATA_DIR (or data.data_dir)"
        ) from None


# ---------------------------------------------------------------------------- windows
def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    out = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [ids for ids in out if len(ids) >= 2]


def _rng(*keys: int) -> random.Random:
    return random.Random(hash(tuple(keys)) & 0xFFFFFFFFFFFF)


class WindowStream:
    """Deterministic endless stream of ``(input_ids, attention_mask)`` windows of length ``L``.

    The order depends only on ``seed``, the epoch and the position, so ``state()`` /
    ``load_state()`` make a resumed run read exactly what an uninterrupted run would.
    """

    def __init__(
        self,
        docs: list[list[int]],
        window: int,
        mode: str,
        seed: int,
        pad_id: int,
        eos_id: int | None,
    ):
        if not docs:
            raise DataError("no document has at least 2 tokens")
        self.docs, self.L, self.mode, self.seed = docs, window, mode, seed
        self.pad_id, self.eos_id = pad_id, eos_id if eos_id is not None else pad_id
        self.epoch, self.index = 0, 0
        self._epoch_windows: list[list[int]] | None = None

    def _windows(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.docs)))
        _rng(self.seed, epoch, 1).shuffle(order)
        if self.mode == "random":
            out = []
            for d in order:
                ids = self.docs[d]
                if len(ids) > self.L:
                    start = _rng(self.seed, epoch, 2, d).randrange(len(ids) - self.L + 1)
                    ids = ids[start : start + self.L]
                out.append(ids)
            return out
        stream: list[int] = []
        for d in order:
            stream.extend(self.docs[d])
            stream.append(self.eos_id)
        n = len(stream) // self.L
        if n == 0:
            return [stream[: self.L]]
        return [stream[i * self.L : (i + 1) * self.L] for i in range(n)]

    def _current(self) -> list[list[int]]:
        if self._epoch_windows is None:
            self._epoch_windows = self._windows(self.epoch)
        return self._epoch_windows

    def next_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, L)`` ids and mask (right-padded to the longest window in the batch)."""
        rows = []
        for _ in range(n):
            windows = self._current()
            if self.index >= len(windows):
                self.epoch, self.index, self._epoch_windows = self.epoch + 1, 0, None
                windows = self._current()
            rows.append(windows[self.index])
            self.index += 1
        return collate(rows, self.pad_id)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._epoch_windows = int(state["epoch"]), int(state["index"]), None


def collate(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def fixed_windows(docs: list[list[int]], window: int, n: int, seed: int) -> list[list[int]]:
    """``n`` deterministic validation windows (one per document, first ``n`` documents)."""
    stream = WindowStream(docs[:n], window, "random", seed, 0, None)
    return stream._windows(0)[:n]
