"""Answers: what a generated rationale says the answer is, and whether it is right.

:func:`extract_answer` reads the answer a rationale gives; :func:`is_correct` compares it with
the gold answer -- the filter that decides which rationales STaR keeps (Zelikman et al. 2022,
Sec. 3.1) and the label of V-STaR's verifier data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation


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
NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def extract_number(text: str) -> str | None:
    """The answer a rationale gives: the number after ``####`` or "the answer is", else the last
    number in the text; normalised (no ``$`` or thousands separators, no trailing ``.0``)."""
    for pattern in (rf"####\s*({NUMBER})", rf"[Tt]he (?:final )?answer is:?\s*({NUMBER})"):
        found = re.findall(pattern, text)
        if found:
            return normalise_number(found[-1])
    found = re.findall(NUMBER, text)
    return normalise_number(found[-1]) if found else None


def normalise_number(raw: str) -> str:
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
EXTRACTORS = {"gsm8k": extract_number, "csqa": extract_letter, "arith": extract_number}


def extract_answer(task: str, text: str) -> str | None:
    """The answer ``text`` gives: GSM8K and arithmetic a normalised number
    (:func:`extract_number`), CommonsenseQA a capital letter (:func:`extract_letter`); ``None``
    when it gives none."""
    if task not in EXTRACTORS:
        raise ValueError(f"unknown question-answer task {task!r}; known: {', '.join(EXTRACTORS)}")
    return EXTRACTORS[task](text)


def is_correct(example: QAExample, text: str) -> bool:
    """Whether ``text`` (a generated rationale) reaches ``example``'s gold answer."""
    got = extract_answer(example.task, text)
    if got is None:
        return False
    if example.task in ("gsm8k", "arith"):  # numbers: "3.50" == "3.5"
        return _same_number(got, example.answer)
    return got == example.answer


_FINAL = re.compile(r"####|[Tt]he (?:final )?answer is")


def reaches_answer(example: QAExample, text: str) -> bool:
    """Whether ``text`` reaches the gold answer *by its reasoning*: it is correct
    (:func:`is_correct`) and the rationale before its final answer derives it -- for a number,
    an equation whose result is that number (``... = 42``); for a CommonsenseQA letter, the
    chosen option's text named. A rationalisation that only repeats the hinted answer ("The
    answer is 42.") does not count (STaR keeps rationalised rationales only when they reach the
    answer; Zelikman et al. 2022, Sec. 3.2)."""
    if not is_correct(example, text):
        return False
    cut = _FINAL.search(text)
    body = text[: cut.start()] if cut else text
    if example.task == "csqa":
        option = re.search(rf"\({example.answer}\) ([^\n]+)", example.question)
        return bool(option) and option.group(1).strip().lower() in body.lower()
    results = re.findall(rf"=\s*({NUMBER})", body)
    return any(_same_number(normalise_number(r), example.answer) for r in results)
