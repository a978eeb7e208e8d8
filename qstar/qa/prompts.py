"""Prompts: :func:`format_prompt` builds the STaR few-shot prompt ``Q: ...\\nA: <rationale> The
answer is <answer>.\\n\\n ... Q: <question>\\nA:``; with ``hint`` it is the rationalization
prompt, the gold answer given in the question line (Zelikman et al. 2022, Sec. 3.2). A kept
rationale trains on the prompt *without* the hint followed by :func:`format_target`
(:func:`training_text`), as if the model had found it unaided. The few-shot exemplars
(:data:`SHOTS`) were written for this project.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from qstar.qa.answers import EXTRACTORS, QAExample
from qstar.qa.arith import question, scratchpad


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

# Additions of 2, 3, 4 and 5 digits, from the training half of the problems (never held out),
# the rationale written by qstar.qa.arith.scratchpad: carries, a column without one, a new digit.
ARITH_SHOTS: tuple[QAExample, ...] = tuple(
    _shot("arith", i, question(a, b), scratchpad(a, b), str(a + b))
    for i, (a, b) in enumerate(((48, 36), (517, 346), (5839, 4763), (47205, 38619)))
)

SHOTS: dict[str, tuple[QAExample, ...]] = {
    "gsm8k": GSM8K_SHOTS,
    "csqa": CSQA_SHOTS,
    "arith": ARITH_SHOTS,
}


def shots_for(task: str) -> tuple[QAExample, ...]:
    """The shipped few-shot exemplars of ``task`` (:data:`SHOTS`)."""
    if task not in SHOTS:
        raise ValueError(f"unknown question-answer task {task!r}; known: {', '.join(EXTRACTORS)}")
    return SHOTS[task]


def format_target(rationale: str | None, answer: str) -> str:
    """``" <rationale> The answer is <answer>."``: what follows ``A:`` (and what a kept rationale
    trains on)."""
    rationale = (rationale or "").strip()
    return f" {rationale} The answer is {answer}." if rationale else f" The answer is {answer}."


def _with_hint(question: str, hint: str) -> str:
    """``" (Hint: the answer is <hint>)"`` after the question line, before any answer options."""
    options = re.search(r"\n\([A-Z]\) ", question)
    cut = options.start() if options else len(question)
    return f"{question[:cut]} (Hint: the answer is {hint}){question[cut:]}"


def format_prompt(
    example: QAExample,
    shots: Sequence[QAExample],
    hint: str | None = None,
    hint_shots: bool = True,
) -> str:
    """The STaR prompt: each shot as ``Q: ...\\nA: <rationale> The answer is <answer>.\\n\\n``,
    then ``Q: <question>\\nA:``. ``hint`` makes it the rationalization prompt (Zelikman et al.
    2022, Sec. 3.2): ``" (Hint: the answer is <hint>)"`` after the question line, and, as in the
    paper's rationalization prompt, after each worked example's question its own answer
    (``hint_shots``), so the examples show how a hinted question is answered."""
    parts = []
    for s in shots:
        q = _with_hint(s.question, s.answer) if hint is not None and hint_shots else s.question
        parts.append(f"Q: {q}\nA:{format_target(s.rationale, s.answer)}\n\n")
    question = example.question if hint is None else _with_hint(example.question, hint)
    return "".join(parts) + f"Q: {question}\nA:"


def training_text(example: QAExample, shots: Sequence[QAExample], rationale: str) -> str:
    """What a kept rationale trains on: the prompt *without* any hint, then the rationale and
    the gold answer -- a rationalized example reads as if found unaided (STaR, Sec. 3.2)."""
    return format_prompt(example, shots) + format_target(rationale, example.answer)
