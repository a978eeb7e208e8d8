"""The STaR family's recipes (qstar/recipes/star.py, trice.py, vstar.py) and the question-answer
sampler and scorer they share (qstar/qa/sampling.py, scoring.py): the loops' mechanics on a
tiny random model, the completion loss against a hand-built reference, rationalisation without
the hint, resume."""

from __future__ import annotations

import json

import pytest
import torch

from qstar import qa
from qstar.qa import answers
from qstar.qa.sampling import common_prefix, sample_rationales, stop_text
from qstar.qa.scoring import completion_batch, completion_logprobs, completion_loss
from qstar.recipes import registry, star
from qstar.recipes.train import format_summary, train
from qstar.run_config import load_run_config
from qstar.runs.build import build_model


def _cfg(*overrides: str):
    return load_run_config(_shipped(), list(overrides))


def _shipped() -> str:
    from qstar.run_config import resolve_config

    return resolve_config("star_debug_tiny")


@pytest.fixture
def lenient(monkeypatch):
    """A random model never answers correctly: accept every other question so that the loop
    keeps rationales and fine-tunes (the checker itself is tested in test_qa.py)."""

    def is_correct(example, text):
        return int(example.id.rsplit("/", 1)[-1]) % 2 == 0

    monkeypatch.setattr(answers, "is_correct", is_correct)


def test_star_runs_and_writes_its_run_directory(tmp_path, lenient):
    cfg = _cfg()
    summary = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    assert (run / "summary.json").is_file() and (run / "final").is_dir()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    its = [r for r in rows if r["kind"] == "iteration"]
    assert [r["iteration"] for r in its] == [1, 2]
    assert all(r["kept"] == r["correct"] + r["rationalized"] and r["kept"] > 0 for r in its)
    trains = [r for r in rows if r["kind"] == "train"]
    # 2 steps, then 2 x 1.2 -> 3 (the paper's growth), counted over the run
    assert [r["step"] for r in trains] == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trains)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["iteration"] for r in evals] == [0, 1, 2] and "eval/qa_acc" in evals[-1]
    kept = [
        json.loads(x)
        for x in (run / "iterations" / "iter_1" / "kept.jsonl").read_text().splitlines()
    ]
    assert kept and all("Hint" not in r["prompt"] for r in kept)
    assert summary["steps"] == 5 and len(summary["per_iteration"]) == 2
    assert "iteration 2" in format_summary(cfg, summary)
    assert (run / "checkpoints" / "latest").is_file()  # the one checkpoint format


def test_star_fine_tunes_from_the_base_model_each_iteration(tmp_path, lenient, monkeypatch):
    """Every iteration starts its fine-tuning from the base weights, not from the last model."""
    starts = []
    real = star.finetune

    def spy(run, *args, **kwargs):
        starts.append(next(run.qs.base_model.parameters()).detach().clone())
        return real(run, *args, **kwargs)

    monkeypatch.setattr(star, "finetune", spy)
    train(_cfg(), tmp_path / "run")
    assert len(starts) == 2 and torch.equal(starts[0], starts[1])


def test_resume_equals_uninterrupted(tmp_path, lenient):
    cfg = _cfg()
    train(cfg, tmp_path / "a")
    assert train(cfg, tmp_path / "b", stop_after=1)["stopped_at"] == 1
    train(cfg, tmp_path / "b", resume=True)

    def rows(d):
        out = []
        for line in (d / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            out.append({k: v for k, v in r.items() if not k.endswith("_s") and k != "tokens_per_s"})
        return out

    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    from safetensors.torch import load_file

    wa = load_file(next((tmp_path / "a" / "final").glob("*.safetensors")))
    wb = load_file(next((tmp_path / "b" / "final").glob("*.safetensors")))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_completion_loss_counts_only_the_completion(tmp_path):
    cfg = _cfg()
    qs = build_model(cfg, torch.device("cpu"))
    rows = [
        {"prompt": "Q: one plus one?\nA:", "target": " It is 2. The answer is 2."},
        {"prompt": "Q: a much longer question here?\nA:", "target": " 7."},
    ]
    ids, mask, cmask = completion_batch(qs.tokenizer, rows, torch.device("cpu"))
    got = completion_loss(qs, ids, mask, cmask)
    # reference: full logits, log-softmax, mean over the completion targets only
    logits = qs.base_logits(ids, mask).double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    want = -(lp * cmask[:, 1:]).sum() / cmask[:, 1:].sum()
    assert torch.allclose(got.double(), want, atol=1e-5)
    # the first completion token is a target, the last prompt token is not
    p0 = len(qs.tokenizer(rows[0]["prompt"], add_special_tokens=False).input_ids)
    assert cmask[0, p0] and not cmask[0, p0 - 1]


def test_rationalisation_keeps_the_rationale_without_the_hint(monkeypatch):
    cfg = _cfg("star.rationalize=true")
    questions = qa.load_qa("gsm8k", "train", source="openai/gsm8k")[:3]

    def fake(run, prompts, *args, **kwargs):
        # right only when given the hint; the first question's rationale quotes the hint and
        # must be dropped
        out = []
        for p in prompts:
            q = next(q for q in questions if q.question in p.split("\n\n")[-1])
            if "Hint" not in p:
                out.append(" I do not know. The answer is -1.")
            elif q is questions[0]:
                out.append(f" The hint says {q.answer}. The answer is {q.answer}.")
            else:
                out.append(f" We add it up: 0 + {q.answer} = {q.answer}. The answer is {q.answer}.")
        return out

    monkeypatch.setattr(star, "_sample", fake)
    kept, figures = star.collect(None, cfg, questions, seed=0)
    assert figures["correct"] == 0 and figures["rationalized"] == 2 and figures["kept"] == 2
    assert all(
        r["rationalized"] and "Hint" not in r["prompt"] and "hint" not in r["target"] for r in kept
    )
    assert [r["id"] for r in kept] == [q.id for q in questions[1:]]


def test_bad_star_config_is_one_line():
    with pytest.raises(ValueError, match=r"qa\.task must be one of"):
        load_run_config(_shipped(), ["qa.task=mmlu"])
    with pytest.raises(ValueError, match=r"train\.method must be one of"):
        registry.recipe_for(load_run_config(_shipped(), ["train.method=ppo"]))
    with pytest.raises(ValueError, match=r"star\.step_growth"):
        load_run_config(_shipped(), ["star.step_growth=0.5"])


def test_old_star_keys_read_in_their_new_sections():
    """Configs and run directories written when one `star` section served three methods."""
    cfg = load_run_config(_shipped(), ["star.questions=5", "star.samples=3", "star.think=true"])
    assert (cfg.qa.questions, cfg.vstar.samples, cfg.qa.think) == (5, 3, True)


def test_iteration_steps_grow():
    cfg = _cfg("star.steps_per_iteration=10", "star.step_growth=1.2")
    assert [star.iteration_steps(cfg, n) for n in (1, 2, 3)] == [10, 12, 15]


# ------------------------------------------------------------------ TRICE and V-STaR
@pytest.fixture
def coin(monkeypatch):
    """Correctness by a hash of the text: the same question is answered right by some samples and
    wrong by others, which V-STaR's pairs and TRICE's acceptances need."""
    import zlib

    monkeypatch.setattr(answers, "is_correct", lambda ex, text: zlib.crc32(text.encode()) % 2 == 0)


def test_completion_logprobs_equal_the_reference():
    from qstar.core import selftaught

    qs = build_model(_cfg(), torch.device("cpu"))
    rows = [{"prompt": "Q: 2+2?\nA:", "target": " 4."}, {"prompt": "Q: x\nA:", "target": " y z w"}]
    ids, mask, cmask = completion_batch(qs.tokenizer, rows, torch.device("cpu"))
    got = completion_logprobs(qs, ids, mask, cmask)
    want = selftaught.completion_logprob(qs.base_logits(ids, mask), ids, cmask)
    assert torch.allclose(got, want, atol=1e-4)


def test_trice_runs_updates_the_memory_and_the_model(tmp_path, coin):
    cfg = _cfg("train.method=trice", "train.steps=3", "eval.every=2")
    summary = train(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in trains] == [1, 2, 3]
    assert all(
        0 <= r["accept_rate"] <= 1 and torch.isfinite(torch.tensor(r["loss"])) for r in trains
    )
    assert summary["memory_coverage"] > 0 and any(r["grad_norm"] > 0 for r in trains)
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2, 3]
    assert "acceptance" in format_summary(cfg, summary)


def test_trice_resume_equals_uninterrupted(tmp_path, coin):
    cfg = _cfg("train.method=trice", "train.steps=3", "eval.every=2")
    train(cfg, tmp_path / "a")
    assert train(cfg, tmp_path / "b", stop_after=2)["stopped_at"] == 2
    train(cfg, tmp_path / "b", resume=True)

    def rows(d):
        return [
            {k: v for k, v in json.loads(x).items() if not k.endswith("_s")}
            for x in (d / "metrics.jsonl").read_text().splitlines()
        ]

    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    from safetensors.torch import load_file

    wa = load_file(next((tmp_path / "a" / "final").glob("*.safetensors")))
    wb = load_file(next((tmp_path / "b" / "final").glob("*.safetensors")))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_preference_pairs_use_unrationalised_positives_of_the_same_question(tmp_path):
    from qstar.recipes import vstar

    it = tmp_path / "iterations" / "iter_1"
    it.mkdir(parents=True)
    kept = [
        {"id": "q1", "prompt": "P1", "target": "good1", "rationalized": False},
        {"id": "q2", "prompt": "P2", "target": "hinted2", "rationalized": True},
    ]
    rejected = [
        {"id": "q1", "prompt": "P1", "target": "bad1"},
        {"id": "q2", "prompt": "P2", "target": "bad2"},
        {"id": "q3", "prompt": "P3", "target": "bad3"},
    ]
    (it / "kept.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    (it / "rejected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejected))
    assert vstar.preference_pairs(tmp_path, 0) == [
        {"prompt": "P1", "chosen": "good1", "rejected": "bad1"}
    ]


def test_vstar_trains_a_verifier_and_scores_best_of_k(tmp_path, coin):
    cfg = _cfg("train.method=vstar", "vstar.verifier_steps=2", "vstar.samples=3")
    summary = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    assert summary["pairs"] > 0 and (run / "verifier" / "done.json").is_file()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    verif = [r for r in rows if r["kind"] == "verifier"]
    assert [r["step"] for r in verif] == [1, 2] and all(
        torch.isfinite(torch.tensor(r["dpo_loss"])) for r in verif
    )
    last = summary["eval_last"]
    for key in ("eval/vstar_best_of_3", "eval/maj_at_3", "eval/pass_at_1", "eval/qa_acc"):
        assert 0.0 <= last[key] <= 1.0
    assert "preference pairs" in format_summary(cfg, summary)
    # interrupted after the first generator iteration and resumed: the same figures
    assert train(cfg, tmp_path / "run2", stop_after=1)["stopped_at"] == 1
    again = train(cfg, tmp_path / "run2", resume=True)
    assert again["eval_last"] == last and again["pairs"] == summary["pairs"]


def test_greedy_rationales_equal_transformers_generate():
    """The batched, left-padded, KV-cached sampler decodes exactly what transformers' generate
    decodes for each prompt (greedy), whatever the padding of its batch."""
    qs = build_model(_cfg(), torch.device("cpu")).eval()
    tok = qs.tokenizer
    prompts = [
        "Q: one two three\nA:",
        "Q: a much longer question with many words in it\nA:",
        "Q: x\nA:",
    ]
    got = sample_rationales(qs, prompts, 6, 0.0, False, 0, batch=3, stop_early=False)
    assert any(got)  # something was generated
    eos = tok.eos_token_id
    for prompt, text in zip(prompts, got, strict=True):
        ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
        out = qs.base_model.generate(
            input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=eos, eos_token_id=None
        )[0, ids.shape[1] :].tolist()
        if eos in out:
            out = out[: out.index(eos)]
        assert text == stop_text(tok.decode(out, skip_special_tokens=True))


def test_method_table_names_each_method(tmp_path):
    from qstar.analysis.experiment import load_experiment
    from qstar.analysis.report import method_table

    train(_cfg("star.iterations=0"), tmp_path / "run")
    table = method_table(load_experiment(tmp_path / "run"))
    assert list(table["method"]) == ["base model (untrained)"] and table["qa_acc"][0] == 0.0


def test_bad_qa_source_is_one_line_and_writes_nothing(tmp_path):
    from qstar.data import DataError

    bad = tmp_path / "qa.jsonl"
    bad.write_text(
        json.dumps({"question": "2+2?", "answer": "4\n#### 4"})
        + "\n"
        + json.dumps({"question": "Bad", "answer": "no final answer"})
        + "\n"
    )
    with pytest.raises(ValueError, match="qa.eval_source"):
        train(_cfg(f"qa.source={bad}"), tmp_path / "a")
    with pytest.raises(DataError, match=r"qa\.jsonl:2\): answer has no '#### <number>'"):
        train(_cfg(f"qa.source={bad}", f"qa.eval_source={bad}"), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_shared_few_shot_prefix_changes_nothing():
    """Running the worked examples once and sharing their cache gives the same rationales as
    running every prompt whole."""
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2], [1, 2]]) == 1  # each row keeps a token of its own
    qs = build_model(_cfg(), torch.device("cpu")).eval()
    shots = qa.shots_for("gsm8k")[:2]
    questions = qa.load_qa("gsm8k", "test", source="openai/gsm8k", limit=3)
    prompts = [qa.format_prompt(q, shots) for q in questions]
    args = (qs, prompts, 8, 0.0, False, 0, 3)
    shared = sample_rationales(*args, stop_early=False)
    whole = sample_rationales(*args, stop_early=False, share_prefix=False)
    assert any(shared) and shared == whole
    # thinking while it writes (a Quiet-STaR model as the generator)
    args = (qs, prompts, 4, 0.0, True, 0, 3)
    assert sample_rationales(*args, stop_early=False) == sample_rationales(
        *args, stop_early=False, share_prefix=False
    )
    # sampled, too (the same draws in the same order)
    args = (qs, prompts, 8, 1.0, False, 5, 3)
    assert sample_rationales(*args) == sample_rationales(*args, share_prefix=False)
