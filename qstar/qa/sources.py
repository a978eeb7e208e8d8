"""Question-answer examples: :func:`load_qa` reads GSM8K or CommonsenseQA through the one data
path, :func:`qstar.data.resolve` (an explicit path, the data folder, the hub, the bundled
sample), into :class:`~qstar.qa.answers.QAExample` rows: the question, the gold answer (GSM8K:
the normalised final number; CommonsenseQA: the letter) and, where the data set has one, a
worked rationale (GSM8K's solution, calculator annotations ``<<...>>`` removed). A malformed row
raises :class:`qstar.data.DataError` naming the file and line (or the hub row) and the fix.
The arithmetic task's problems are generated (:mod:`qstar.qa.arith`), not read.
:func:`load_examples` reads a run's ``qa`` section.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from qstar.data import DataError, announce, file_rows, resolve
from qstar.qa.answers import CSQA_LETTERS, NUMBER, QAExample, normalise_number
from qstar.qa.arith import DEFAULT_SOURCE as ARITH_SOURCE
from qstar.qa.arith import load as load_arith


def _field(row: dict, name: str, parent: str = "") -> str:
    """The non-empty string ``row[name]`` (``parent``: where ``row`` sits, for the message)."""
    full = f"{parent}.{name}" if parent else name
    if name not in row:
        have = ", ".join(map(str, row)) or "nothing"
        raise DataError(f"field {full!r} is missing (row has: {have})")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"field {full!r} is {type(value).__name__}, not a string")
    if not value.strip():
        raise DataError(f"field {full!r} is empty")
    return value.strip()


def _gsm8k_row(row: dict) -> tuple[str, str, str | None]:
    """``{"question", "answer": "<solution>\\n#### <number>"}`` (official files and the hub)."""
    question, answer = _field(row, "question"), _field(row, "answer")
    solution, sep, final = answer.rpartition("####")
    if not sep or not re.fullmatch(NUMBER, final.strip()):
        raise DataError("answer has no '#### <number>' final answer")
    rationale = re.sub(r"<<[^<>]*>>", "", solution).strip()
    return question, normalise_number(final.strip()), rationale


def _csqa_row(row: dict) -> tuple[str, str, str | None]:
    """The official layout ``{"question": {"stem", "choices": [{"label", "text"}]}, "answerKey"}``
    or the hub's ``{"question": str, "choices": {"label": [...], "text": [...]}, "answerKey"}``."""
    if isinstance(row.get("question"), dict):  # official jsonl
        q = row["question"]
        stem, choices = _field(q, "stem", "question"), q.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise DataError("field 'question.choices' is not a list of {label, text}")
        where = "question.choices"
        pairs = [(_field(c, "label", where), _field(c, "text", where)) for c in choices]
    else:  # the hub's tau/commonsense_qa
        stem, choices = _field(row, "question"), row.get("choices")
        if not (
            isinstance(choices, dict)
            and isinstance(choices.get("label"), list)
            and isinstance(choices.get("text"), list)
            and len(choices["label"]) == len(choices["text"])
        ):
            raise DataError("field 'choices' is not {label: [...], text: [...]} of equal length")
        pairs = [
            (str(label).strip(), str(text).strip())
            for label, text in zip(choices["label"], choices["text"], strict=True)
        ]
    labels = [label for label, _ in pairs]
    if not pairs or len(set(labels)) < len(labels) or not set(labels) <= set(CSQA_LETTERS):
        raise DataError(
            f"choice labels {labels} are not distinct letters among {', '.join(CSQA_LETTERS)}"
        )
    key = row.get("answerKey")
    if not isinstance(key, str) or key.strip() not in labels:
        raise DataError(f"answerKey {key!r} is not among the labels {', '.join(labels)}")
    options = "".join(f"\n({label}) {text}" for label, text in pairs)
    return stem + options, key.strip(), None


@dataclass(frozen=True)
class Task:
    """A question-answer data set: its default source, hub config and row parser; or, for
    generated problems, ``generate(split, source, limit) -> examples`` instead of rows."""

    source: str
    hub_config: str | None
    parse: Callable[[dict], tuple[str, str, str | None]] | None = None
    generate: Callable[[str, str | None, int | None], list[QAExample]] | None = None


TASKS: dict[str, Task] = {
    "gsm8k": Task("openai/gsm8k", "main", _gsm8k_row),
    "csqa": Task("tau/commonsense_qa", None, _csqa_row),
    "arith": Task(ARITH_SOURCE, None, generate=load_arith),
}


def _task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown question-answer task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------------------- loading
def load_qa(
    task: str,
    split: str,
    source: str | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
) -> list[QAExample]:
    """The first ``limit`` (all by default) examples of ``task``'s ``split``, in file order.

    ``source``: a local file, directory or glob, or a hub id (default :data:`TASKS`' one, read
    from ``data_dir`` / ``$QSTAR_DATA_DIR`` when the file is there; see
    :func:`qstar.data.resolve`). Raises :class:`qstar.data.DataError` for a bad row or no rows.
    ``arith``: ``limit`` generated problems of ``source`` ``arith:A-B`` (:func:`qstar.qa.arith.load`).
    """
    spec = _task(task)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    if spec.generate is not None:
        return spec.generate(split, source, limit)
    source = source or spec.source
    resolved = resolve(source, split, data_dir)
    announce(resolved)
    if resolved.kind == "arith":
        raise DataError(f"{source} is generated arithmetic, not {task} data: use qa.task=arith")
    if resolved.kind == "files":
        rows = file_rows(resolved.where)
    else:
        config = spec.hub_config if source == spec.source else None
        rows = _hub_rows(resolved.where, config, split)
    out: list[QAExample] = []
    for i, (location, row) in enumerate(islice(rows, limit)):  # every row is kept or raises
        try:
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, dict):
                raise DataError(f"expected an object with fields, got {type(row).__name__}")
            question, answer, rationale = spec.parse(row)
        except DataError as exc:
            raise DataError(
                f"{task} {split} row {i} ({location}): {exc}; fix or drop the row"
            ) from None
        out.append(QAExample(f"{task}/{split}/{i}", task, question, answer, rationale))
    if not out and limit != 0:
        raise DataError(f"no {task} examples in {resolved.describe()} (split {split!r})")
    return out


def _hub_rows(name: str, config: str | None, split: str) -> Iterator[tuple[str, Any]]:
    """The hub split streamed in its own order (no shuffle: ids are positions)."""
    try:
        import datasets

        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        for row in stream:
            yield f"hub:{name}", row
    except DataError:
        raise
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"cannot stream hub dataset {name!r} ({reason}); where the hub is unreachable use a "
            "local file, or set QSTAR_DATA_DIR (or data.data_dir)"
        ) from None


def load_examples(qa, data_dir: str | None = None, held_out: bool = False) -> list[QAExample]:
    """The training questions of a ``qa`` config section (``source``, ``split``), or with
    ``held_out`` its evaluation questions (``eval_source``, default the same source,
    ``eval_split``). ``arith``: ``questions`` generated problems of ``digits`` (held out:
    ``eval_questions`` of ``eval_digits``, default ``digits``)."""
    if qa.task == "arith":
        digits = (qa.eval_digits or qa.digits) if held_out else qa.digits
        size = qa.eval_questions if held_out else qa.questions
        split = qa.eval_split if held_out else qa.split
        return load_qa("arith", split, source=f"arith:{digits}", limit=size)
    source = qa.source or TASKS[qa.task].source
    if held_out:
        source = qa.eval_source or source
    return load_qa(
        qa.task, qa.eval_split if held_out else qa.split, source=source, data_dir=data_dir
    )


def check_sources(qa) -> None:
    """A local file names no split: used for training and evaluation, it would score the model
    on the questions it trained on. Refused, naming the fix; so is a source for ``arith``,
    whose problems are generated."""
    if qa.task == "arith" and (qa.source or qa.eval_source):
        raise ValueError(
            "qa.source and qa.eval_source are not read by qa.task=arith (its problems are "
            "generated from qa.digits and qa.eval_digits): unset them"
        )
    if qa.source and qa.eval_source is None and Path(qa.source).expanduser().exists():
        raise ValueError(
            f"qa.source={qa.source} is a local file or folder, which holds one split: set "
            "qa.eval_source to the held-out questions (e.g. the test file)"
        )
