"""The arithmetic task ``qstar_arith`` (STaR's n-digit addition, Zelikman et al. 2022, Sec. 5):
held-out additions of 1 to 8 digits, :data:`PER_DIGIT` of each (the first of each digit count
of the ``test`` split of :mod:`qstar.qa.arith`, interleaved, so ``--limit`` keeps the spread),
generated here -- no download, the same problems the recipes' ``eval/qa_acc`` scores (a run's
held-out questions of a digit count are the first ones of these). The prompt is the recipes':
the four worked examples of ``qstar.qa.prompts.SHOTS["arith"]`` as a few-shot chain of thought,
then ``Q: What is A + B?\\nA:``; greedy generation until ``\\nQ:`` or a blank line;
``exact_match``: the number after "The answer is" (else the last number) equals the sum.
The 1-digit rows are the whole 40-problem held-out half of the 81 1-digit problems.
"""

from __future__ import annotations

# qstar is installed wherever these tasks run (the `qstar` lm-eval model)
from qstar.qa.answers import QAExample, is_correct
from qstar.qa.arith import digits_of, load
from qstar.qa.prompts import SHOTS, format_prompt

DIGITS = (1, 8)
PER_DIGIT = 40


def arith_rows() -> list[dict]:
    lo, hi = DIGITS
    problems = load("test", f"arith:{lo}-{hi}", PER_DIGIT * (hi - lo + 1))
    return [
        {"id": q.id, "digits": digits_of(q), "question": q.question, "answer": q.answer}
        for q in problems
    ]


def load_arith(**kwargs):
    """The ``test`` split (the task's metadata, e.g. ``data_dir``, is not needed)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(arith_rows())})


def _example(doc: dict) -> QAExample:
    return QAExample(doc["id"], "arith", doc["question"], doc["answer"])


def arith_prompt(doc: dict) -> str:
    return format_prompt(_example(doc), SHOTS["arith"])


def arith_process_results(doc: dict, results: list) -> dict:
    """``results``: ``[completion]`` -> ``exact_match`` (0 or 1)."""
    return {"exact_match": float(is_correct(_example(doc), results[0]))}
