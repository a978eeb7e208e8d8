"""Question-answer data for the STaR family (STaR, TRICE, V-STaR): examples, answer checks, prompts.

Examples
  :func:`load_qa` reads GSM8K or CommonsenseQA through the one data path,
  :func:`qstar.data.resolve` (an explicit path, the data folder, the hub, the bundled sample),
  into :class:`QAExample` rows: the question, the gold answer (GSM8K: the normalised final
  number; CommonsenseQA: the letter) and, where the data set has one, a worked rationale
  (GSM8K's solution, calculator annotations ``<<...>>`` removed). A malformed row raises
  :class:`qstar.data.DataError` naming the file and line (or the hub row) and the fix.

Answers
  :func:`extract_answer` reads the answer a generated rationale gives; :func:`is_correct`
  compares it with the gold answer -- the filter that decides which rationales STaR keeps
  (Zelikman et al. 2022, Sec. 3.1) and the label of V-STaR's verifier data.

Prompts
  :func:`format_prompt` builds the STaR few-shot prompt ``Q: ...\\nA: <rationale> The answer is
  <answer>.\\n\\n ... Q: <question>\\nA:``; with ``hint`` it is the rationalization prompt, the
  gold answer given in the question line (Sec. 3.2). A kept rationale trains on the prompt
  *without* the hint followed by :func:`format_target` (:func:`training_text`), as if the model
  had found it unaided. The few-shot exemplars (:data:`SHOTS`) were written for this project.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from itertools import islice
from typing import Any

from qstar.data import DataError, announce, file_rows, resolve


@dataclass(frozen=True)
class QAExample:
    """One question with its gold answer.

    ``id``: ``"{task}/{split}/{row}"``, ``row`` the 0-based position in the split as read;
    ``question``: for CommonsenseQA the stem followed by ``"\\n(A) text\\n(B) ..."``;
    ``answer``: GSM8K the normalised final number (``"1234.5"``), CommonsenseQA the letter;
    ``rationale``: GSM8K the worked solution before ``####`` without ``<<...>>``; CommonsenseQA
    ``None`` (the data set has none; the few-shot exemplars carry one).
    """

    id: str
    task: str
    question: str
    answer: str
    rationale: str | None = None


# ---------------------------------------------------------------------------- numbers (GSM8K)
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def extract_number(text: str) -> str | None:
    """The answer a rationale gives: the number after ``####`` or "the answer is", else the last
    number in the text; normalised (no ``$`` or thousands separators, no trailing ``.0``)."""
    for pattern in (rf"####\s*({_NUMBER})", rf"[Tt]he (?:final )?answer is:?\s*({_NUMBER})"):
        found = re.findall(pattern, text)
        if found:
            return _normalise_number(found[-1])
    found = re.findall(_NUMBER, text)
    return _normalise_number(found[-1]) if found else None


def _normalise_number(raw: str) -> str:
    s = raw.replace("$", "").replace(",", "").rstrip(".")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s or "0"


def majority(answers: list[str | None]) -> str | None:
    """The most common answer (``None`` counts for nothing); the earliest on ties."""
    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def _same_number(a: str, b: str) -> bool:
    try:
        return Decimal(a) == Decimal(b)  # "3.50" == "3.5", "007" == "7"
    except InvalidOperation:
        return a == b


# ---------------------------------------------------------------------------- letters (CSQA)
CSQA_LETTERS = "ABCDE"

# A letter token. "I" (the pronoun) is never a bare letter; a parenthesised letter outside A-E
# is read, and means no valid answer.
_LETTER = (
    r"(?:\((?P<par>[A-Za-z])\)"  # "(c)", any case
    r"|(?P<cap>[A-E])(?![A-Za-z0-9])"  # "C", not "Car"
    r"|(?P<low>[a-e])(?=[ \t]*(?:[.,;:!?)\n]|$)))"  # "c" before punctuation or the line's end,
)  # so "the answer is c" counts and "the answer is a bank" does not
_STATED = re.compile(
    r"(?:(?i:\banswer\s*(?:is\b\s*:?|:))|####)\s*(?i:(?:option|choice)\s+)?" + _LETTER
)
_MENTIONED = re.compile(r"\((?P<par>[A-Za-z])\)")
_FINAL_LINE = re.compile(r"^\s*\(?(?P<par>[A-Ea-e])\)?\s*[.:]?\s*$")


def extract_letter(text: str) -> str | None:
    """The option a CommonsenseQA rationale picks, as a capital letter, or ``None``.

    In order: the last explicit statement ("the answer is (C)", "Answer: c", "#### C"); a final
    line that is only a letter; the last option mentioned as "(C)". A parenthesised letter
    outside A-E there means no valid answer (``None``).
    """
    stated = list(_STATED.finditer(text))
    if stated:
        return _letter(stated[-1])
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and (final := _FINAL_LINE.match(lines[-1])):
        return _letter(final)
    mentioned = list(_MENTIONED.finditer(text))
    return _letter(mentioned[-1]) if mentioned else None


def _letter(match: re.Match) -> str | None:
    letter = next(v for v in match.groupdict().values() if v).upper()
    return letter if letter in CSQA_LETTERS else None


# ---------------------------------------------------------------------------- rows
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
    if not sep or not re.fullmatch(_NUMBER, final.strip()):
        raise DataError("answer has no '#### <number>' final answer")
    rationale = re.sub(r"<<[^<>]*>>", "", solution).strip()
    return question, _normalise_number(final.strip()), rationale


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
    """A question-answer data set: its default source, hub config, row parser, answer reader."""

    source: str
    hub_config: str | None
    parse: Callable[[dict], tuple[str, str, str | None]]
    extract: Callable[[str], str | None]


TASKS: dict[str, Task] = {
    "gsm8k": Task("openai/gsm8k", "main", _gsm8k_row, extract_number),
    "csqa": Task("tau/commonsense_qa", None, _csqa_row, extract_letter),
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
    """
    spec = _task(task)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    source = source or spec.source
    resolved = resolve(source, split, data_dir)
    announce(resolved)
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


# ---------------------------------------------------------------------------- answers
def extract_answer(task: str, text: str) -> str | None:
    """The answer ``text`` gives: GSM8K a normalised number (:func:`extract_number`),
    CommonsenseQA a capital letter (:func:`extract_letter`); ``None`` when it gives none."""
    return _task(task).extract(text)


def is_correct(example: QAExample, text: str) -> bool:
    """Whether ``text`` (a generated rationale) reaches ``example``'s gold answer."""
    got = extract_answer(example.task, text)
    if got is None:
        return False
    return _same_number(got, example.answer) if example.task == "gsm8k" else got == example.answer


# ---------------------------------------------------------------------------- prompts
def _shot(task: str, n: int, question: str, rationale: str, answer: str) -> QAExample:
    return QAExample(f"{task}/shot/{n}", task, question, answer, rationale)


# Written for qstar (not taken from a paper or a data set): short, one idea per step, the last
# number of each GSM8K rationale is its answer, every equation holds (tests/test_qa.py checks).
GSM8K_SHOTS: tuple[QAExample, ...] = (
    _shot(
        "gsm8k",
        0,
        "A baker makes 24 muffins in the morning and 18 in the afternoon. She sells 30 of them. "
        "How many muffins does she have left?",
        "She makes 24 + 18 = 42 muffins. After selling 30 she has 42 - 30 = 12 left.",
        "12",
    ),
    _shot(
        "gsm8k",
        1,
        "Tom reads 15 pages a day for 6 days and 20 pages on the seventh day. How many pages does "
        "he read that week?",
        "In the first 6 days he reads 15 * 6 = 90 pages. With the seventh day that is "
        "90 + 20 = 110 pages.",
        "110",
    ),
    _shot(
        "gsm8k",
        2,
        "A notebook costs $2.50 and a pen costs $1.25. Maya buys 4 notebooks and 2 pens. How many "
        "dollars does she spend?",
        "The notebooks cost 4 * 2.50 = 10 dollars and the pens cost 2 * 1.25 = 2.50 dollars. "
        "Together she spends 10 + 2.50 = 12.50 dollars.",
        "12.5",
    ),
    _shot(
        "gsm8k",
        3,
        "A class of 28 students forms teams of 4, and every team gets 3 balls. How many balls "
        "are handed out?",
        "There are 28 / 4 = 7 teams. They get 7 * 3 = 21 balls.",
        "21",
    ),
)

CSQA_SHOTS: tuple[QAExample, ...] = (
    _shot(
        "csqa",
        0,
        "Where would you keep milk so that it stays cold?\n(A) cupboard\n(B) refrigerator"
        "\n(C) oven\n(D) mailbox\n(E) bookshelf",
        "Milk spoils when it gets warm, and the place at home that keeps food cold is the "
        "refrigerator.",
        "B",
    ),
    _shot(
        "csqa",
        1,
        "What does someone who is very tired at night usually do?\n(A) run a race"
        "\n(B) paint a wall\n(C) buy a car\n(D) go to sleep\n(E) start cooking",
        "Tiredness is the body asking for rest, and the way to rest at night is to go to sleep.",
        "D",
    ),
    _shot(
        "csqa",
        2,
        "What could you use to cross a wide river without getting wet?\n(A) bridge"
        "\n(B) umbrella\n(C) shovel\n(D) ladder\n(E) blanket",
        "Only a bridge spans the water, so people can walk over the river and stay dry.",
        "A",
    ),
    _shot(
        "csqa",
        3,
        "Where can a person borrow a book for free?\n(A) bakery\n(B) stadium\n(C) garage"
        "\n(D) pharmacy\n(E) library",
        "Shops sell things, but lending books to anyone without charge is what a library does.",
        "E",
    ),
)

SHOTS: dict[str, tuple[QAExample, ...]] = {"gsm8k": GSM8K_SHOTS, "csqa": CSQA_SHOTS}


def shots_for(task: str) -> tuple[QAExample, ...]:
    """The shipped few-shot exemplars of ``task`` (:data:`SHOTS`)."""
    _task(task)
    return SHOTS[task]


def format_target(rationale: str | None, answer: str) -> str:
    """``" <rationale> The answer is <answer>."``: what follows ``A:`` (and what a kept rationale
    trains on)."""
    rationale = (rationale or "").strip()
    return f" {rationale} The answer is {answer}." if rationale else f" The answer is {answer}."


def format_prompt(example: QAExample, shots: Sequence[QAExample], hint: str | None = None) -> str:
    """The STaR prompt: each shot as ``Q: ...\\nA: <rationale> The answer is <answer>.\\n\\n``,
    then ``Q: <question>\\nA:``. ``hint`` (rationalization, Zelikman et al. 2022 Sec. 3.2) adds
    ``" (Hint: the answer is <hint>)"`` to the question line, before any answer options."""
    parts = [f"Q: {s.question}\nA:{format_target(s.rationale, s.answer)}\n\n" for s in shots]
    question = example.question
    if hint is not None:
        options = re.search(r"\n\([A-Z]\) ", question)
        cut = options.start() if options else len(question)
        question = f"{question[:cut]} (Hint: the answer is {hint}){question[cut:]}"
    return "".join(parts) + f"Q: {question}\nA:"


def training_text(example: QAExample, shots: Sequence[QAExample], rationale: str) -> str:
    """What a kept rationale trains on: the prompt *without* any hint, then the rationale and
    the gold answer -- a rationalized example reads as if found unaided (STaR, Sec. 3.2)."""
    return format_prompt(example, shots) + format_target(rationale, example.answer)
