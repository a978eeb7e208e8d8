"""The arithmetic task (STaR's n-digit addition): generation, the disjoint splits, the
scratchpad, answer checks, config errors, per-digit accuracy, the lm-eval task, the plain text."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
import torch

from qstar import QuietStar, QuietStarConfig
from qstar.data import DataError, load_documents
from qstar.qa import arith, format_prompt, format_target, is_correct, load_examples, load_qa
from qstar.qa.answers import QAExample, reaches_answer
from qstar.qa.prompts import SHOTS
from qstar.qa.sampling import qa_accuracy
from qstar.run_config import load_run_config


def _pairs(examples):
    return {tuple(map(int, re.findall(r"\d+", q.question))) for q in examples}


# ---------------------------------------------------------------------------- problems
def test_generation_is_seeded_spread_and_interleaved():
    first = load_qa("arith", "train", source="arith:1-3", limit=7)
    assert first == load_qa("arith", "train", source="arith:1-3", limit=7)  # fixed, no RNG state
    assert [arith.digits_of(q) for q in first] == [1, 2, 3, 1, 2, 3, 1]  # 3, 2, 2: smaller first
    assert first[4].id == "arith/train/d2/1" and first[4].task == "arith"
    for q in first:
        a, b = map(int, re.findall(r"\d+", q.question))
        n = arith.digits_of(q)
        assert q.question == f"What is {a} + {b}?" and q.answer == str(a + b)
        assert len(str(a)) == len(str(b)) == n and str(a)[0] != "0" and str(b)[0] != "0"
        assert q.rationale == arith.scratchpad(a, b)
    # a digit count's problems are a prefix of the split's, whatever the size or range asked
    more = load_qa("arith", "train", source="arith:2-5", limit=40)
    d2 = [q for q in more if arith.digits_of(q) == 2]
    assert [q.question for q in d2[:2]] == [q.question for q in first if q.id.count("/d2/")]
    assert Counter(arith.digits_of(q) for q in more) == {2: 10, 3: 10, 4: 10, 5: 10}
    with pytest.raises(ValueError, match="not an arithmetic example id"):
        arith.digits_of(QAExample("gsm8k/test/0", "gsm8k", "q", "1"))


def test_the_order_is_a_permutation_and_the_splits_are_disjoint_halves():
    for n in (1, 2):
        total = (9 * 10 ** (n - 1)) ** 2
        pairs = [arith.pair(n, k) for k in range(total)]
        assert len(set(pairs)) == total and all(
            arith.position(*p) == (n, k) for k, p in enumerate(pairs)
        )
    ones_train = _pairs(load_qa("arith", "train", source="arith:1", limit=40))
    ones_test = _pairs(load_qa("arith", "test", source="arith:1", limit=40))
    assert len(ones_train) == len(ones_test) == 40 and not ones_train & ones_test  # 80 of 81
    assert {p for p in ones_train if arith.split_of(*p) != "train"} == set()
    for digits in ("2", "3-4"):
        train = _pairs(load_qa("arith", "train", source=f"arith:{digits}", limit=3000))
        test = _pairs(load_qa("arith", "test", source=f"arith:{digits}", limit=3000))
        assert len(train) == len(test) == 3000 and not train & test
    with pytest.raises(
        DataError, match="asks? for 41 1-digit ones, but the test split holds only 40"
    ):
        load_qa("arith", "test", source="arith:1", limit=41)


def test_a_run_config_gives_disjoint_training_and_held_out_questions():
    qa = load_run_config(None, ["qa.task=arith", "qa.eval_digits=1-8", "qa.eval_questions=24"]).qa
    assert (qa.digits, qa.eval_digits, qa.questions) == ("1-5", "1-8", 64)
    train, test = load_examples(qa), load_examples(qa, held_out=True)
    assert len(train) == 64 and len(test) == 24 and not _pairs(train) & _pairs(test)
    assert {arith.digits_of(q) for q in test} == set(range(1, 9))
    assert all(q.id.startswith("arith/test/") for q in test)


# ---------------------------------------------------------------------------- scratchpad, answers
def _check_scratchpad(a: int, b: int) -> None:
    text = arith.scratchpad(a, b)
    columns = re.findall(r"(\d) \+ (\d)(?: \+ (\d))? = (\d+), write (\d+)(?: carry (\d))?\.", text)
    assert len(columns) == len(str(a)), text
    carry, written = 0, []
    for j, (x, y, c, s, w, out) in enumerate(columns):
        assert (int(x), int(y)) == (int(str(a)[-1 - j]), int(str(b)[-1 - j]))
        assert int(c or 0) == carry and (c == "") == (j == 0)
        assert int(s) == int(x) + int(y) + carry
        last = j == len(columns) - 1
        assert (w, out) == ((s, "") if last else (str(int(s) % 10), str(int(s) // 10)))
        carry = int(s) // 10
        written.insert(0, w)
    assert int("".join(written)) == a + b
    assert text.endswith(f" So {a} + {b} = {a + b}.") and "answer" not in text.lower()


def test_the_scratchpad_reaches_the_sum_of_random_problems():
    rng = random.Random(0)
    _check_scratchpad(95, 17)  # a carry into a new leading digit: 112
    _check_scratchpad(7, 5)
    for _ in range(400):
        n = rng.randint(1, 20)
        _check_scratchpad(rng.randrange(10 ** (n - 1), 10**n), rng.randrange(10 ** (n - 1), 10**n))
    assert arith.scratchpad(624, 257) == (
        "4 + 7 = 11, write 1 carry 1. 2 + 5 + 1 = 8, write 8 carry 0. 6 + 2 + 0 = 8, write 8. "
        "So 624 + 257 = 881."
    )


def test_is_correct_and_reaches_answer_accept_the_scratchpad_not_an_echo():
    for q in load_qa("arith", "test", source="arith:1-6", limit=30):
        full = format_target(q.rationale, q.answer)
        assert is_correct(q, full) and reaches_answer(q, full)
        echo = f" The answer is {q.answer}."
        assert is_correct(q, echo) and not reaches_answer(q, echo)
        assert not is_correct(q, format_target(q.rationale, str(int(q.answer) + 1)))
    q = QAExample("arith/test/d2/0", "arith", "What is 95 + 17?", "112")
    assert is_correct(q, "The answer is 112.0") and not is_correct(q, "The answer is 1120.")


def test_the_worked_examples():
    shots = SHOTS["arith"]
    assert len(shots) == 4 and [len(s.question.split()[2]) for s in shots] == [2, 3, 4, 5]
    for s in shots:
        a, b = map(int, re.findall(r"\d+", s.question))
        assert s.rationale == arith.scratchpad(a, b) and s.answer == str(a + b)
        assert arith.split_of(a, b) == "train"  # never a held-out problem
    ex = load_qa("arith", "test", source="arith:3", limit=1)[0]
    prompt = format_prompt(ex, shots)
    assert prompt.startswith("Q: What is 48 + 36?\nA: 8 + 6 = 14, write 4 carry 1.")
    assert prompt.endswith(f"\n\nQ: {ex.question}\nA:") and prompt.count("The answer is") == 4


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["qa.digits=5-2"],
            r"qa.digits must be a range like 1-5 with 1 <= a <= b <= 20, got '5-2'",
        ),
        (["qa.digits=0-3"], r"qa.digits must be a range like 1-5"),
        (["qa.digits=1-21"], r"qa.digits must be a range like 1-5"),
        (["qa.eval_digits=3-"], r"qa.eval_digits must be a range like 1-5 .* got '3-'"),
        (["qa.eval_split=train"], r"qa.eval_split and split must be test and train"),
        (["qa.split=validation"], r"qa.eval_split and split must be test and train"),
        (["qa.digits=1", "qa.questions=41"], r"qa.digits=1 with 41 questions needs 41 1-digit"),
        (
            ["qa.eval_digits=1-2", "qa.eval_questions=81"],
            r"qa.eval_digits=1-2 with 81 questions needs 41 1-digit problems, but a split holds "
            r"only 40",
        ),
    ],
)
def test_bad_arith_configs_fail_at_load_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message) as info:
        load_run_config(None, ["qa.task=arith", *overrides])
    assert "\n" not in str(info.value)


def test_the_arith_keys_do_not_bother_other_tasks():
    cfg = load_run_config(None, ["qa.digits=5-2", "qa.eval_split=train"])  # gsm8k: unused
    assert cfg.qa.task == "gsm8k"
    with pytest.raises(ValueError, match="not read by qa.task=arith"):
        from qstar.qa import check_sources

        qa = load_run_config(None, ["qa.task=arith", "qa.source=x.jsonl"]).qa
        check_sources(qa)


# ---------------------------------------------------------------------------- per-digit accuracy
def test_qa_accuracy_breaks_arithmetic_down_by_digits():
    from qstar.models.random import tiny_model

    model, tok = tiny_model("llama")
    qs = QuietStar.from_base(model, tok, QuietStarConfig(thought_len=2, n_true=1))
    qa = load_run_config(
        None, ["qa.task=arith", "qa.eval_digits=1-2", "qa.max_new_tokens=3", "qa.shots=1"]
    ).qa
    questions = load_qa("arith", "test", source="arith:1-2", limit=4)
    torch.manual_seed(0)
    out = qa_accuracy(qs, qa, questions)
    assert set(out) == {
        "eval/qa_acc",
        "eval/qa_n",
        "eval/qa_acc_d1",
        "eval/qa_n_d1",
        "eval/qa_acc_d2",
        "eval/qa_n_d2",
    }
    assert out["eval/qa_n"] == 4 and out["eval/qa_n_d1"] == out["eval/qa_n_d2"] == 2
    assert arith.accuracy_by_digits(questions, [True, False, True, True]) == {
        "eval/qa_acc_d1": 1.0,
        "eval/qa_n_d1": 2.0,
        "eval/qa_acc_d2": 0.5,
        "eval/qa_n_d2": 2.0,
    }


# ---------------------------------------------------------------------------- lm-eval
def test_the_lm_eval_task_holds_the_recipes_held_out_problems_and_runs():
    from qstar.evaluation.backend import QStarLM, evaluate
    from qstar.evaluation.lookup import TASK_DIR, check_task_file, resolve_tasks
    from qstar.evaluation.tasks import qstar_arith_utils as utils
    from qstar.models.random import tiny_model

    check_task_file(TASK_DIR / "qstar_arith.yaml")
    specs, _ = resolve_tasks(["qstar_arith"])
    assert specs == ["qstar_arith"]
    rows = utils.arith_rows()
    assert len(rows) == 320 and Counter(r["digits"] for r in rows) == {n: 40 for n in range(1, 9)}
    qa = load_run_config(None, ["qa.task=arith", "qa.eval_digits=1-8", "qa.eval_questions=40"]).qa
    held_out = load_examples(qa, held_out=True)
    by_id = {r["id"]: r for r in rows}
    assert all(by_id[q.id]["question"] == q.question for q in held_out)  # the same problems
    doc = rows[0]
    assert utils.arith_prompt(doc) == format_prompt(held_out[0], SHOTS["arith"])
    assert utils.arith_process_results(doc, [f" x. The answer is {doc['answer']}."]) == {
        "exact_match": 1.0
    }

    model, tok = tiny_model("llama")
    qs = QuietStar.from_base(model, tok, QuietStarConfig(thought_len=2, n_true=1))
    results = evaluate(QStarLM(model=qs, batch_size=2, max_gen_toks=4), ["qstar_arith"], limit=2)
    assert 0.0 <= results["results"]["qstar_arith"]["exact_match,none"] <= 1.0
    assert results["n-samples"]["qstar_arith"]["effective"] == 2


# ---------------------------------------------------------------------------- plain text
def test_data_source_arith_yields_question_and_answer_documents():
    train = load_documents("arith:1-3", "train", max_documents=6)
    assert train.origin == "generated" and train.source == "arith:1-3"
    questions = load_qa("arith", "train", source="arith:1-3", limit=6)
    assert train.texts == [f"Q: {q.question}\nA: The answer is {q.answer}." for q in questions]
    test = load_documents("arith:1-3", "test", max_documents=60)
    assert not set(test.texts) & set(load_documents("arith:1-3", "train", max_documents=60).texts)
    for source, split, message in [
        ("arith:5-2", "train", r"data source arith:5-2: digits must be a range like 1-5"),
        ("arith:1-5", "validation", r"has the splits train and test, not 'validation'"),
    ]:
        with pytest.raises(DataError, match=message):
            load_documents(source, split, max_documents=3)
    with pytest.raises(DataError, match="set data.max_documents"):
        load_documents("arith:1-5", "train")


def test_quiet_star_trains_on_arith_and_reports_per_digit_accuracy(tmp_path, tiny_run_config):
    from qstar.recipes.train import train
    from qstar.runs.tracking import read_metrics

    cfg = tiny_run_config(
        "data.source=arith:1-3",
        "data.max_documents=30",
        "train.steps=2",
        "eval.every=2",
        "eval.qa=true",
        "qa.task=arith",
        "qa.eval_questions=3",
        "qa.max_new_tokens=3",
        "qa.shots=1",
    )
    train(cfg, tmp_path / "run")
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals and all(f"eval/qa_acc_d{n}" in evals[-1] for n in (1, 2, 3))
