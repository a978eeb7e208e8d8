"""Task functions for the paper-protocol tasks (Zelikman et al. 2024, Sec. 5 / Appendix).

Protocol: zero-shot, no exemplars, no chain of thought. GSM8K ``Q: {question}\\nA: {number}\\n``,
CommonsenseQA ``Q: {stem}\\n(A) ...\\n(E) ...\\nA: {letter}\\n``. Metrics per example:

* ``soft_score`` (the authors' score): for each answer character (the newline included) the
  probability of the gold character renormalised over a small set -- digits and newline for
  GSM8K, the five letters and newline for CommonsenseQA -- multiplied over the answer;
  the task value is the mean over examples.
* ``acc``: every answer character is the argmax of its renormalised set.
* ``exact_match``: the whole answer is the model's greedy continuation over the full vocabulary.

One lm-eval document per example: the choices are ``answer[:j] + s`` for every position ``j``
and every ``s`` of the set, all after the same prompt. Renormalising within position ``j`` cancels
the common prefix ``answer[:j]``, so the choice log-likelihoods give exactly the renormalised
next-character probabilities, and ``--limit N`` means N examples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# qstar is installed wherever these tasks run (the `qstar` lm-eval model); re-exported here
from qstar.qa.answers import (  # noqa: F401
    NUMBER,
    extract_letter,
    extract_number,
    majority,
    normalise_number,
)

DIGITS = [str(d) for d in range(10)] + ["\n"]
LETTERS = ["A", "B", "C", "D", "E", "\n"]


# ---------------------------------------------------------------------------- prompts
def gsm8k_number(doc: dict) -> str:
    """The final number after ``####``, without thousands separators."""
    answer = doc["answer"].split("####")[-1].strip()
    return answer.replace(",", "").replace("$", "")


def gsm8k_prompt(doc: dict) -> str:
    return f"Q: {doc['question'].strip()}\nA: "


def gsm8k_answer(doc: dict) -> str:
    return gsm8k_number(doc) + "\n"


def csqa_prompt(doc: dict) -> str:
    labels, texts = doc["choices"]["label"], doc["choices"]["text"]
    options = "\n".join(f"({label}) {text}" for label, text in zip(labels, texts, strict=True))
    return f"Q: {doc['question'].strip()}\n{options}\nA: "


def csqa_answer(doc: dict) -> str:
    return doc["answerKey"].strip() + "\n"


# ---------------------------------------------------------------------------- choices and scoring
def _positions(answer: str, charset: list[str]) -> list[tuple[list[str], int]]:
    """For each answer character: (choice strings, index of the gold one)."""
    out = []
    for j, gold in enumerate(answer):
        chars = charset if gold in charset else [*charset, gold]  # rare: '-' or '.' in GSM8K
        out.append(([answer[:j] + c for c in chars], chars.index(gold)))
    return out


def _choices(answer: str, charset: list[str]) -> list[str]:
    return [c for choices, _ in _positions(answer, charset) for c in choices]


def gsm8k_choices(doc: dict) -> list[str]:
    return _choices(gsm8k_answer(doc), DIGITS)


def csqa_choices(doc: dict) -> list[str]:
    return _choices(csqa_answer(doc), LETTERS)


def gsm8k_target(doc: dict) -> int:
    """Index of the full gold answer among the choices (for logging)."""
    return _gold_full_index(gsm8k_answer(doc), DIGITS)


def csqa_target(doc: dict) -> int:
    return _gold_full_index(csqa_answer(doc), LETTERS)


def _gold_full_index(answer: str, charset: list[str]) -> int:
    positions = _positions(answer, charset)
    return sum(len(choices) for choices, _ in positions[:-1]) + positions[-1][1]


def score(answer: str, charset: list[str], results: list) -> dict:
    """``results``: ``(loglikelihood, is_greedy)`` per choice, in choice order."""
    positions = _positions(answer, charset)
    lls = [float(r[0]) for r in results]
    soft, acc, start = 1.0, 1, 0
    for choices, gold in positions:
        group = lls[start : start + len(choices)]
        top = max(group)
        norm = top + math.log(sum(math.exp(x - top) for x in group))
        soft *= math.exp(group[gold] - norm)
        acc &= int(group.index(top) == gold)
        start += len(choices)
    full = start - len(positions[-1][0]) + positions[-1][1]
    return {"soft_score": soft, "acc": acc, "exact_match": int(bool(results[full][1]))}


def gsm8k_process_results(doc: dict, results: list) -> dict:
    return score(gsm8k_answer(doc), DIGITS, results)


def csqa_process_results(doc: dict, results: list) -> dict:
    return score(csqa_answer(doc), LETTERS, results)


# ---------------------------------------------------------------------------- local data
def data_dir(**kwargs) -> Path:
    """The local data folder (``--data-dir`` / ``$QSTAR_DATA_DIR``, read by ``qstar.data``)."""
    from qstar.data import data_dir as _data_dir

    root = _data_dir(kwargs.get("data_dir"))
    if root is None:
        raise FileNotFoundError(
            "the local task variants read files from a data directory: pass --data-dir DIR "
            "(or set QSTAR_DATA_DIR) to a folder holding gsm8k/ and csqa/"
        )
    return root


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: set --data-dir / QSTAR_DATA_DIR to the folder holding it"
        )
    return path


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with _require(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
    return rows


def _gsm8k(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(
        [{"question": r["question"], "answer": r["answer"]} for r in rows]
    )


def load_gsm8k_local(**kwargs):
    """GSM8K train/test from ``DATA_DIR/gsm8k/{train,test}.jsonl`` (the hub's field names)."""
    import datasets

    root = data_dir(**kwargs) / "gsm8k"
    splits = {}
    for split in ("test", "train"):  # test is required; train (few-shot examples) if present
        path = root / f"{split}.jsonl"
        if split == "test" or path.is_file():
            splits[split] = _gsm8k(_jsonl(path))
    return datasets.DatasetDict(splits)


def _csqa_row(row: dict) -> dict:
    """Official CommonsenseQA jsonl -> the hub's (tau/commonsense_qa) layout."""
    q = row["question"]
    return {
        "id": row.get("id", ""),
        "question": q["stem"],
        "question_concept": q.get("question_concept", ""),
        "choices": {
            "label": [c["label"] for c in q["choices"]],
            "text": [c["text"] for c in q["choices"]],
        },
        "answerKey": row.get("answerKey", ""),
    }


def load_csqa_local(**kwargs):
    """CommonsenseQA train/validation from ``DATA_DIR/csqa/{train,dev}_rand_split.jsonl``."""
    import datasets

    root = data_dir(**kwargs) / "csqa"
    files = {"validation": "dev_rand_split.jsonl", "train": "train_rand_split.jsonl"}
    return datasets.DatasetDict(
        {  # validation is required; train if present
            split: datasets.Dataset.from_list([_csqa_row(r) for r in _jsonl(root / name)])
            for split, name in files.items()
            if split == "validation" or (root / name).is_file()
        }
    )


def _resolved(hub_id: str, split: str, local_loader, hub_args: tuple, to_rows, **kwargs):
    """``split`` of ``hub_id`` as ``qstar.data.resolve`` finds it: the data folder (through
    ``local_loader``), the hub, or the bundled 300-row sample (said on stderr)."""
    from qstar.data import announce, resolve

    found = resolve(hub_id, split, kwargs.get("data_dir"))
    if found.origin == "data_dir":
        return local_loader(**kwargs)
    import datasets

    if found.kind == "hub":
        return datasets.load_dataset(hub_id, *hub_args)
    announce(found)
    return datasets.DatasetDict({split: to_rows(_jsonl(found.where[0]))})


def load_gsm8k(**kwargs):
    """GSM8K test: local files, the hub's ``openai/gsm8k``, or the bundled sample."""
    return _resolved("openai/gsm8k", "test", load_gsm8k_local, ("main",), _gsm8k, **kwargs)


def load_csqa(**kwargs):
    """CommonsenseQA validation: local files, the hub's ``tau/commonsense_qa``, or the bundled
    sample."""
    import datasets

    def rows(raw):
        return datasets.Dataset.from_list([_csqa_row(r) for r in raw])

    return _resolved("tau/commonsense_qa", "validation", load_csqa_local, (), rows, **kwargs)


# ---------------------------------------------------------------------------- chain of thought
# Zero-shot chain of thought with a majority vote (the paper's Sec. 5.3 protocol: 8 sampled
# rationales, thinking at every generated token). lm-eval's own `repeats` machinery produces the
# samples; its filters collapse them to one answer before `process_results`, so instead the
# `take_first_k` filter keeps all k (a no-op for k = repeats) and `gsm8k_cot_process_results`
# scores them together: maj@k (the most common extracted answer, first on ties) and pass@1 (the
# mean accuracy of the k samples, an unbiased estimate, rather than the first sample alone).
# The answer reading (`extract_number`, `majority`) lives in qstar.qa, shared with the STaR family.
def gsm8k_cot_prompt(doc: dict) -> str:
    return f"Q: {doc['question'].strip()}\nA: Let's think step by step."


def gsm8k_cot_process_results(doc: dict, results: list) -> dict:
    """``results``: ``[[k generated rationales]]`` -> ``maj@k`` and ``pass@1``."""
    samples = results[0] if results and isinstance(results[0], list) else list(results)
    gold = normalise_number(gsm8k_number(doc))
    answers = [extract_number(s) for s in samples]
    return {
        f"maj@{len(answers)}": float(majority(answers) == gold),
        "pass@1": sum(a == gold for a in answers) / max(len(answers), 1),
    }


def csqa_cot_prompt(doc: dict) -> str:
    return csqa_prompt(doc) + "Let's think step by step."


def csqa_letter(doc: dict) -> str:
    return doc["answerKey"].strip()


def csqa_cot_process_results(doc: dict, results: list) -> dict:
    """``results``: ``[[k generated rationales]]`` -> ``maj@k`` and ``pass@1``, reading the
    letter each rationale settles on (:func:`qstar.qa.extract_letter`)."""
    samples = results[0] if results and isinstance(results[0], list) else list(results)
    gold = csqa_letter(doc)
    answers = [extract_letter(s) for s in samples]
    return {
        f"maj@{len(answers)}": float(majority(answers) == gold),
        "pass@1": sum(a == gold for a in answers) / max(len(answers), 1),
    }
