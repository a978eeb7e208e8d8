"""Question-answer data for the STaR family: loading, bad rows, answer checks, prompts."""

from __future__ import annotations

import json
import re
import sys
from types import SimpleNamespace

import pytest

from qstar import data
from qstar.data import BUILTIN_DIR, DataError
from qstar.qa import (
    CSQA_SHOTS,
    GSM8K_SHOTS,
    SHOTS,
    QAExample,
    extract_answer,
    format_prompt,
    format_target,
    is_correct,
    load_qa,
    shots_for,
    training_text,
)

GOOD_GSM8K = {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}
GOOD_CSQA = json.loads((BUILTIN_DIR / "csqa_validation.jsonl").read_text().splitlines()[0])


@pytest.fixture
def offline(monkeypatch):
    """No data folder, no hub: the default sources fall back to the bundled samples."""
    monkeypatch.delenv("QSTAR_DATA_DIR", raising=False)
    monkeypatch.setattr("qstar.hub.hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(data, "_ANNOUNCED", set())


# ---------------------------------------------------------------------------- loading
def test_gsm8k_from_the_bundled_sample(offline, capsys):
    examples = load_qa("gsm8k", "train")
    assert len(examples) == 300 and "bundled 300-row GSM8K train sample" in capsys.readouterr().err
    first = examples[0]
    assert first.id == "gsm8k/train/0" and first.task == "gsm8k" and first.answer == "72"
    assert first.question.startswith("Natalia sold clips to 48 of her friends")
    assert first.rationale == (
        "Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May."
    )
    for ex in examples:
        assert "<<" not in ex.rationale and "####" not in ex.rationale
        assert re.fullmatch(r"-?\d+(\.\d+)?", ex.answer), ex
        assert is_correct(ex, ex.rationale + "\n#### " + ex.answer)
    assert [e.id for e in examples[:3]] == ["gsm8k/train/0", "gsm8k/train/1", "gsm8k/train/2"]


def test_csqa_from_the_bundled_sample_with_limit(offline):
    examples = load_qa("csqa", "validation", limit=5)
    assert len(examples) == 5 and examples[4].id == "csqa/validation/4"
    first = examples[0]
    assert first.answer == "A" and first.rationale is None and first.task == "csqa"
    assert first.question == (
        "A revolving door is convenient for two direction travel, but it also serves as a "
        "security measure at a what?\n(A) bank\n(B) library\n(C) department store\n(D) mall"
        "\n(E) new york"
    )
    assert load_qa("csqa", "validation", limit=0) == []
    with pytest.raises(DataError, match="tau/commonsense_qa.*unreachable"):  # no bundled train
        load_qa("csqa", "train")


def test_an_explicit_file_and_the_hub_layout_of_csqa(tmp_path):
    path = BUILTIN_DIR / "gsm8k_test.jsonl"
    assert len(load_qa("gsm8k", "test", source=str(path), limit=7)) == 7
    hub_row = {  # tau/commonsense_qa on the hub: flat question, choices as two lists
        "id": "x",
        "question": "Where do fish live?",
        "question_concept": "fish",
        "choices": {
            "label": ["A", "B", "C", "D", "E"],
            "text": ["sea", "sky", "car", "tree", "box"],
        },
        "answerKey": "A",
    }
    f = tmp_path / "hub.jsonl"
    f.write_text(json.dumps(hub_row) + "\n")
    (ex,) = load_qa("csqa", "validation", source=str(f))
    assert ex.question == "Where do fish live?\n(A) sea\n(B) sky\n(C) car\n(D) tree\n(E) box"
    assert ex.answer == "A" and ex.id == "csqa/validation/0"


def test_the_hub_is_streamed_in_order_with_the_main_config(offline, monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([GOOD_GSM8K, {"question": "q", "answer": "no final number"}])

    monkeypatch.setattr("qstar.hub.hub_reachable", lambda *a, **k: True)
    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    (ex,) = load_qa("gsm8k", "test", limit=1)
    assert ex == QAExample("gsm8k/test/0", "gsm8k", "What is 2 + 3?", "5", "2 + 3 = 5")
    assert calls == [("openai/gsm8k", "main", "test", True)]
    with pytest.raises(DataError, match=r"^gsm8k test row 1 \(hub:openai/gsm8k\): answer has no"):
        load_qa("gsm8k", "test")


def test_the_data_folder(shared_data, monkeypatch):
    monkeypatch.setattr("qstar.hub.hub_reachable", lambda *a, **k: False)
    for task, split, rows in [
        ("gsm8k", "test", 1319),
        ("gsm8k", "train", 7473),
        ("csqa", "validation", 1221),
        ("csqa", "train", 9741),
    ]:
        examples = load_qa(task, split, data_dir=str(shared_data))
        assert len(examples) == rows and len({e.id for e in examples}) == rows
        assert all(is_correct(e, f"The answer is {e.answer}.") for e in examples)
    assert len(load_qa("csqa", "train", data_dir=str(shared_data), limit=3)) == 3


def test_unknown_task_and_bad_limit():
    with pytest.raises(
        ValueError, match=r"unknown question-answer task 'aqua'; known: gsm8k, csqa"
    ):
        load_qa("aqua", "test")
    with pytest.raises(ValueError, match="unknown question-answer task"):
        extract_answer("aqua", "The answer is 3")
    with pytest.raises(ValueError, match="limit must be >= 0"):
        load_qa("gsm8k", "test", source=str(BUILTIN_DIR / "gsm8k_test.jsonl"), limit=-1)


# ---------------------------------------------------------------------------- bad rows
def _bad(tmp_path, task, bad_line: str, fix_hint: str) -> str:
    """Load a file whose third line (second row, a blank line between) is ``bad_line``."""
    good = json.dumps(GOOD_GSM8K if task == "gsm8k" else GOOD_CSQA)
    f = tmp_path / "rows.jsonl"
    f.write_text(f"{good}\n\n{bad_line}\n{good}\n")
    with pytest.raises(DataError) as info:
        load_qa(task, "train", source=str(f))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{task} train row 1 ({f}:3): ")  # row 1 of the split, line 3
    assert message.endswith("; fix or drop the row")
    assert fix_hint in message, message
    return message


def test_bad_row_invalid_json(tmp_path):
    _bad(tmp_path, "gsm8k", "{oops", "invalid JSON")


def test_bad_row_not_an_object(tmp_path):
    _bad(
        tmp_path,
        "gsm8k",
        json.dumps(["question", "answer"]),
        "expected an object with fields, got list",
    )


def test_bad_row_missing_field(tmp_path):
    _bad(tmp_path, "gsm8k", json.dumps({"question": "q"}), "field 'answer' is missing")
    _bad(tmp_path, "csqa", json.dumps({"answerKey": "A"}), "field 'question' is missing")
    bare = {**GOOD_CSQA, "question": {"choices": GOOD_CSQA["question"]["choices"]}}
    _bad(tmp_path, "csqa", json.dumps(bare), "field 'question.stem' is missing")


def test_bad_row_field_of_the_wrong_type(tmp_path):
    _bad(tmp_path, "gsm8k", json.dumps({"question": 3, "answer": "#### 3"}), "'question' is int")


@pytest.mark.parametrize("answer", ["so 5", "2 + 3 = 5\n#### five", "#### ", "#### 5 apples"])
def test_bad_row_gsm8k_without_a_final_number(tmp_path, answer):
    row = json.dumps({"question": "q", "answer": answer})
    _bad(tmp_path, "gsm8k", row, "answer has no '#### <number>' final answer")


def test_bad_row_csqa_answer_key_not_a_label(tmp_path):
    for key in ["F", "", None]:
        row = json.dumps({**GOOD_CSQA, "answerKey": key})
        _bad(tmp_path, "csqa", row, f"answerKey {key!r} is not among the labels A, B, C, D, E")


def test_bad_row_csqa_choices(tmp_path):
    q = {**GOOD_CSQA["question"], "choices": "bank, library"}
    _bad(tmp_path, "csqa", json.dumps({**GOOD_CSQA, "question": q}), "not a list of {label, text}")
    q = {**GOOD_CSQA["question"], "choices": [{"label": "Z", "text": "bank"}]}
    _bad(tmp_path, "csqa", json.dumps({**GOOD_CSQA, "question": q}), "not distinct letters")


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no gsm8k examples in .*empty.jsonl"):
        load_qa("gsm8k", "train", source=str(tmp_path / "empty.jsonl"))


# ---------------------------------------------------------------------------- answer checks
@pytest.mark.parametrize(
    "text, number",
    [
        ("It costs $1,234.50 in total", "1234.5"),
        ("The answer is $1,000.", "1000"),
        ("He ends 8 below zero, so -8", "-8"),
        ("The answer is -3.", "-3"),
        ("It is 3.50", "3.5"),
        ("So 3 + 4 = 7 and 7 * 6 = 42 and 100.\n#### 42", "42"),
        ("#### 42 then the text rambles: 17 19", "42"),
        ("The answer is 7.", "7"),
        ("The answer is 7. Checking: 2 + 5 = 7, and 9 is wrong", "7"),
        ("the final answer is: 0.25", "0.25"),
        ("no number here", None),
        ("", None),
    ],
)
def test_gsm8k_answers(text, number):
    assert extract_answer("gsm8k", text) == number


def test_gsm8k_is_correct_compares_numbers():
    ex = QAExample("gsm8k/test/0", "gsm8k", "q", "3.5")
    assert is_correct(ex, "The answer is 3.50") and is_correct(ex, "it costs $3.5")
    assert not is_correct(ex, "The answer is 35") and not is_correct(ex, "no idea")
    big = QAExample("gsm8k/test/1", "gsm8k", "q", "1200")
    assert is_correct(big, "#### 1,200") and is_correct(big, "The answer is $1,200.00.")
    assert not is_correct(big, "The answer is 12. 1200 is wrong")  # the stated answer wins


@pytest.mark.parametrize(
    "text, letter",
    [
        ("The answer is (C).", "C"),
        ("the answer is c", "C"),
        ("the answer is c\nbecause it fits", "C"),
        ("Answer: (c)", "C"),
        ("answer: b.", "B"),
        ("#### C", "C"),
        ("The correct answer is option D", "D"),
        ("A bank keeps money safe, so it must be (A) bank", "A"),
        ("Not (B) or (E); the best fit is (C) department store", "C"),
        ("(A) and (D) are both places, but\nD", "D"),  # a bare final letter line
        ("Thinking it over\n(b)", "B"),
        # the last explicit statement wins, over earlier ones and over later mentions
        ("The answer is A. No wait, the answer is (E). (B) was tempting", "E"),
        ("I think the answer is B", "B"),  # "I", the pronoun, is not a letter
        ("I", None),
        ("I think so. I am sure.", None),
        ("The answer is a bank", None),  # the article, not option (a)
        ("The answer is (F)", None),  # outside A-E
        ("(F) none of these", None),
        ("Both (A) and (B) work, but the answer is (F).", None),
        ("no letter here", None),
        ("", None),
    ],
)
def test_csqa_answers(text, letter):
    assert extract_answer("csqa", text) == letter


def test_csqa_is_correct():
    ex = QAExample("csqa/validation/0", "csqa", "q\n(A) bank\n(B) library", "A")
    assert is_correct(ex, "A revolving door secures a bank. The answer is (a).")
    assert not is_correct(ex, "The answer is B.") and not is_correct(ex, "I do not know")


# ---------------------------------------------------------------------------- prompts
def test_prompt_layout():
    ex = QAExample("gsm8k/test/0", "gsm8k", "What is 2 + 3?", "5")
    shots = GSM8K_SHOTS[:2]
    s0, s1 = shots
    assert format_prompt(ex, shots) == (
        f"Q: {s0.question}\nA: {s0.rationale} The answer is 12.\n\n"
        f"Q: {s1.question}\nA: {s1.rationale} The answer is 110.\n\n"
        "Q: What is 2 + 3?\nA:"
    )
    assert format_prompt(ex, []) == "Q: What is 2 + 3?\nA:"
    assert format_prompt(ex, [], hint="5") == "Q: What is 2 + 3? (Hint: the answer is 5)\nA:"
    assert format_target("2 + 3 = 5.", "5") == " 2 + 3 = 5. The answer is 5."
    assert format_target(None, "5") == " The answer is 5." == format_target("  ", "5")


def test_csqa_hint_sits_on_the_question_line_before_the_options():
    ex = QAExample("csqa/train/0", "csqa", "Where is a fish?\n(A) sea\n(B) sky", "A")
    assert format_prompt(ex, [], hint="A") == (
        "Q: Where is a fish? (Hint: the answer is A)\n(A) sea\n(B) sky\nA:"
    )


@pytest.mark.parametrize(
    "ex, rationale",
    [
        (QAExample("gsm8k/train/9", "gsm8k", "What is 6 * 7?", "42"), "6 * 7 = 42."),
        (
            QAExample("csqa/train/9", "csqa", "Where is a fish?\n(A) sea\n(B) sky", "A"),
            "Fish need water, and only the sea has it.",
        ),
    ],
)
def test_rationalized_training_text_never_shows_the_hint(ex, rationale):
    shots = SHOTS[ex.task]
    assert "(Hint: the answer is" in format_prompt(ex, shots, hint=ex.answer)
    text = training_text(ex, shots, rationale)  # the rationale was found with the hint
    assert "hint" not in text.lower()
    assert text == format_prompt(ex, shots) + format_target(rationale, ex.answer)
    assert text.endswith(f"Q: {ex.question}\nA: {rationale} The answer is {ex.answer}.")
    assert is_correct(ex, text[len(format_prompt(ex, shots)) :])


def test_shipped_shots_are_correct():
    assert len(GSM8K_SHOTS) == 4 and len(CSQA_SHOTS) == 4
    for task, shots in SHOTS.items():
        assert len({s.question for s in shots}) == 4
        for shot in shots:
            assert shot.task == task and shot.rationale
            assert is_correct(shot, format_target(shot.rationale, shot.answer))
            assert "answer is" not in shot.rationale.lower()
            if task in ("gsm8k", "arith"):  # the rationale alone reaches the answer, steps hold
                assert is_correct(shot, shot.rationale)
                steps = re.findall(r"([\d.]+(?: [-+*/] [\d.]+)+) = ([\d.]+)", shot.rationale)
                assert steps
                for lhs, rhs in steps:
                    assert abs(eval(lhs) - float(rhs)) < 1e-9, (lhs, rhs)  # digits and + - * /
            else:  # the gold option exists and the rationale names it, never another letter
                options = dict(re.findall(r"\n\(([A-E])\) (.+)", shot.question))
                assert list(options) == list("ABCDE")
                assert options[shot.answer] in shot.rationale
                assert extract_answer(task, shot.rationale) in (None, shot.answer)
    assert [s.answer for s in CSQA_SHOTS] != ["A"] * 4  # the gold letters vary
    assert shots_for("gsm8k") is GSM8K_SHOTS and shots_for("csqa") is CSQA_SHOTS
    with pytest.raises(ValueError, match="known: gsm8k, csqa"):
        shots_for("aqua")
