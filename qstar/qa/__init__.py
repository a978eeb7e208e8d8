"""Question-answer data for the STaR family (STaR, TRICE, V-STaR) and for a Quiet-STaR run's
held-out accuracy: examples (:mod:`~qstar.qa.sources`), answer checks
(:mod:`~qstar.qa.answers`), prompts and worked examples (:mod:`~qstar.qa.prompts`), sampling
rationales and held-out accuracy (:mod:`~qstar.qa.sampling`), scoring completions
(:mod:`~qstar.qa.scoring`). The names below are the public interface; tests that replace the
answer checker patch ``qstar.qa.answers.is_correct``, which every caller reads at call time."""

from qstar.qa.answers import (
    CSQA_LETTERS,
    EXTRACTORS,
    QAExample,
    extract_answer,
    extract_letter,
    extract_number,
    is_correct,
    majority,
    normalise_number,
)
from qstar.qa.prompts import (
    CSQA_SHOTS,
    GSM8K_SHOTS,
    SHOTS,
    format_prompt,
    format_target,
    shots_for,
    training_text,
)
from qstar.qa.sources import TASKS, check_sources, load_examples, load_qa

__all__ = [
    "CSQA_LETTERS",
    "CSQA_SHOTS",
    "GSM8K_SHOTS",
    "EXTRACTORS",
    "QAExample",
    "SHOTS",
    "TASKS",
    "check_sources",
    "extract_answer",
    "extract_letter",
    "extract_number",
    "format_prompt",
    "format_target",
    "is_correct",
    "load_examples",
    "load_qa",
    "majority",
    "normalise_number",
    "shots_for",
    "training_text",
]
