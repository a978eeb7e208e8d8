"""The STaR family as its papers define it (issue 23's review): TRICE's step gradient is the
surrogate of the whole batch (accumulation included, the control variate over the batch, the
scored tokens exactly the sampled ones, empty memories contributing nothing); STaR trains on the
format it samples with, grows its steps by 1.2 and keeps a rationalisation only when its
reasoning reaches the answer, with the answer shown in the worked examples too; V-STaR
accumulates its generator's data and starts its verifier from the gold-solution model, and
best-of-k picks the verifier's argmax."""

from __future__ import annotations

import json
import types
import zlib

import pytest
import torch

from qstar.core import selftaught
from qstar.qa import QAExample, answers, format_prompt, load_examples, shots_for
from qstar.qa.scoring import completion_batch_ids, completion_logprobs
from qstar.recipes import trice
from qstar.recipes.train import train
from qstar.recipes.vstar import VStarRecipe, gold_rows
from qstar.run_config import load_run_config, resolve_config
from qstar.runs import distributed
from qstar.runs.build import build_model


def _cfg(*overrides):
    return load_run_config(
        resolve_config("star_debug_tiny"), ["logging.progress=false", *overrides]
    )


@pytest.fixture
def coin(monkeypatch):
    def is_correct(ex, text):
        return zlib.crc32((ex.id + text).encode()) % 2 == 0

    monkeypatch.setattr(answers, "is_correct", is_correct)


def _fake_run(qs):
    return types.SimpleNamespace(
        qs=qs,
        model=qs,
        device=torch.device("cpu"),
        autocast=torch.autocast("cpu", enabled=False),
        ctx=distributed.Context(),
    )


# ------------------------------------------------------------------ TRICE
def test_trice_step_gradient_is_the_batch_surrogate_with_micro_batches_of_one():
    """Four questions scored one per micro-batch (the accumulation of trice_backward) give the
    gradient of trice_surrogate over the whole batch, beta included (a micro-batch of one has no
    other question to take a leave-one-out rate from: computed per micro-batch, beta would be 0)."""
    qs = build_model(_cfg(), torch.device("cpu"))
    run = _fake_run(qs)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 250, (6,), generator=gen).tolist() for _ in range(4)]
    props = [{"ids": torch.randint(5, 250, (4,), generator=gen).tolist()} for _ in range(4)]
    mem = [{"ids": torch.randint(5, 250, (5,), generator=gen).tolist()} for _ in range(4)]
    correct = torch.tensor([True, False, False, True])
    contributes = torch.tensor([True, True, False, True])  # question 2: an empty memory
    memories = [props[0], mem[1], None, props[3]]
    beta = selftaught.trice_control_variate(correct, contributes)
    assert beta[1] > 0  # the batch's rate: this test can fail
    for i in range(4):  # micro-batches of one, as the recipe accumulates them
        trice.trice_backward(
            run, [prompts[i]], [props[i]], [memories[i]], beta[i : i + 1], contributes[i : i + 1], 4
        )
    got = {n: p.grad.clone() for n, p in qs.named_parameters() if p.grad is not None}
    qs.zero_grad()

    def logp(ids_list):
        pairs = list(zip(prompts, ids_list, strict=True))
        return completion_logprobs(qs, *completion_batch_ids(0, pairs, torch.device("cpu")))

    lp_prop = logp([z["ids"] for z in props])
    lp_mem = logp([(m or props[i])["ids"] for i, m in enumerate(memories)])
    (-selftaught.trice_surrogate(lp_mem, lp_prop, correct, contributes)).backward()
    want = {n: p.grad for n, p in qs.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and got
    for n in got:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-4, msg=n)


def test_an_empty_memory_adds_nothing_and_is_left_out_of_the_rate():
    c = torch.tensor([True, False, False, True])
    m = torch.tensor([True, False, True, True])
    beta = selftaught.trice_control_variate(c, m)
    # leave-one-out over the 3 contributing questions: (2 - c_i) / 2
    assert beta.tolist() == pytest.approx([0.5, 0.0, 1.0, 0.5])


def test_trice_scores_exactly_the_sampled_token_ids(tmp_path, monkeypatch, coin):
    """The proposal's score covers the ids the sampler drew (here ids that re-tokenising the
    text would not give back), not the text re-tokenised with EOS appended."""
    seen, drawn = [], {}

    def fake_sample(run, prompts, seed, what=None):
        out = []
        for i, _ in enumerate(prompts):
            ids = [7, 8, 9, 10 + (seed + i) % 50]
            drawn.setdefault("all", []).append(ids)
            out.append((f" It is {i}. The answer is {i}.", ids))
        return out

    real = trice.completion_batch_ids

    def spy(pad, pairs, device):
        seen.extend(t for _, t in pairs)
        return real(pad, pairs, device)

    monkeypatch.setattr(trice, "_sample", fake_sample)
    monkeypatch.setattr(trice, "completion_batch_ids", spy)
    train(_cfg("train.method=trice", "train.steps=1", "eval.every=1"), tmp_path / "run")
    assert seen and all(s in drawn["all"] for s in seen)


def test_trice_logs_a_nonzero_control_variate_with_micro_batches_of_one(tmp_path, coin):
    train(
        _cfg("train.method=trice", "train.steps=3", "eval.every=3", "train.micro_batch_size=1"),
        tmp_path / "run",
    )
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("beta_mean", 0) > 0 for r in rows if r["kind"] == "train")


@pytest.mark.parametrize("override", ["qa.temperature=0.7", "qa.think=true"])
def test_trice_refuses_proposals_that_are_not_the_model(override, tmp_path):
    with pytest.raises(ValueError, match="TRICE's control variate needs proposals"):
        train(_cfg("train.method=trice", override), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ STaR
def test_star_trains_on_the_format_it_samples_with(tmp_path, coin):
    train(_cfg(), tmp_path / "run")
    kept = [
        json.loads(x)
        for x in (tmp_path / "run" / "iterations" / "iter_1" / "kept.jsonl")
        .read_text()
        .splitlines()
    ]
    shots = shots_for("gsm8k")[: _cfg().qa.shots]
    assert kept and all(r["prompt"].startswith(f"Q: {shots[0].question}") for r in kept)
    assert all("Hint" not in r["prompt"] for r in kept)
    train(_cfg("star.train_format=zero_shot"), tmp_path / "zero")
    kept = (tmp_path / "zero" / "iterations" / "iter_1" / "kept.jsonl").read_text().splitlines()
    assert all(
        json.loads(x)["prompt"].startswith("Q: ") and "\n\n" not in json.loads(x)["prompt"]
        for x in kept
    )


def test_star_grows_its_steps_as_the_paper_does():
    assert _cfg().star.step_growth == 1.2


def test_a_rationalisation_counts_only_if_its_reasoning_reaches_the_answer():
    q = QAExample("gsm8k/train/0", "gsm8k", "Tom has 3 apples and buys 4. How many?", "7")
    assert not answers.reaches_answer(q, " The answer is 7.")  # echoes the hint
    assert not answers.reaches_answer(q, " 3 + 4 = 8. The answer is 7.")  # does not derive it
    assert answers.reaches_answer(q, " 3 + 4 = 7. The answer is 7.")
    c = QAExample("csqa/train/0", "csqa", "Where do fish live?\n(A) desert\n(B) river", "B")
    assert not answers.reaches_answer(c, " The answer is B.")
    assert answers.reaches_answer(c, " Fish swim in a river. The answer is B.")


def test_the_rationalisation_prompt_shows_the_answer_in_the_worked_examples():
    q = QAExample("gsm8k/test/0", "gsm8k", "What is 2 + 3?", "5")
    shots = shots_for("gsm8k")[:2]
    hinted = format_prompt(q, shots, hint="5")
    assert hinted.count("(Hint: the answer is") == 3  # two worked examples and the question
    for s in shots:
        assert f"(Hint: the answer is {s.answer})" in hinted
    assert "Hint" not in format_prompt(q, shots)


# ------------------------------------------------------------------ V-STaR
def test_vstar_accumulates_the_generators_data(tmp_path, coin):
    cfg = _cfg(
        "train.method=vstar", "star.iterations=2", "vstar.samples=2", "vstar.verifier_steps=1"
    )
    recipe = VStarRecipe(cfg)
    run = types.SimpleNamespace(run_dir=tmp_path, ctx=distributed.Context())
    it = tmp_path / "iterations" / "iter_1"
    it.mkdir(parents=True)
    (it / "kept.jsonl").write_text(json.dumps({"id": "a", "prompt": "P", "target": "T"}) + "\n")
    now = [{"id": "b", "prompt": "P2", "target": "T2"}]
    assert [r["id"] for r in recipe.training_data(run, 2, now)] == ["a", "b"]
    single = VStarRecipe(_cfg("train.method=vstar", "vstar.accumulate=false"))
    assert single.training_data(run, 2, now) == now


def test_vstar_verifier_starts_from_the_gold_solution_model(tmp_path, coin):
    cfg = _cfg(
        "train.method=vstar", "star.iterations=1", "vstar.samples=2", "vstar.verifier_steps=1"
    )
    questions = load_qa_rows(cfg)
    rows = gold_rows(cfg, questions)
    assert rows and all(r["target"].endswith(".") for r in rows)
    train(cfg, tmp_path / "run")
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any(json.loads(x)["kind"] == "verifier_sft" for x in metrics)


def load_qa_rows(cfg):
    return load_examples(cfg.qa)[:8]


def test_best_of_k_picks_the_verifiers_argmax():
    scores = torch.tensor([[0.1, 0.9, 0.3], [2.0, -1.0, 2.0]])
    correct = torch.tensor([[True, False, True], [False, True, True]])
    # question 1: the argmax (index 1) is wrong; question 2: the first maximum (index 0) is wrong
    assert selftaught.best_of_k(scores, correct) == 0.0
    assert selftaught.best_of_k(scores, ~correct) == 1.0
