"""The STaR recipe (qstar/recipes/star.py): the loop's mechanics on a tiny random model, the
completion loss against a hand-built reference, rationalisation without the hint, resume."""

from __future__ import annotations

import json

import pytest
import torch

from qstar import qa
from qstar.recipes import star
from qstar.run_config import load_run_config


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

    monkeypatch.setattr(qa, "is_correct", is_correct)


def test_star_runs_and_writes_its_run_directory(tmp_path, lenient):
    cfg = _cfg()
    summary = star.train_star(cfg, tmp_path / "run")
    run = tmp_path / "run"
    assert (run / "summary.json").is_file() and (run / "final").is_dir()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    its = [r for r in rows if r["kind"] == "iteration"]
    assert [r["iteration"] for r in its] == [1, 2]
    assert all(r["kept"] == r["correct"] + r["rationalized"] and r["kept"] > 0 for r in its)
    trains = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in trains] == [
        1,
        2,
        3,
        4,
    ]  # 2 steps per iteration, counted over the run
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trains)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["iteration"] for r in evals] == [0, 1, 2] and "eval/qa_acc" in evals[-1]
    kept = [
        json.loads(x)
        for x in (run / "iterations" / "iter_1" / "kept.jsonl").read_text().splitlines()
    ]
    assert kept and all("Hint" not in r["prompt"] for r in kept)
    assert summary["steps"] == 4 and len(summary["per_iteration"]) == 2
    assert "iteration 2" in star.format_summary(summary)


def test_star_fine_tunes_from_the_base_model_each_iteration(tmp_path, lenient, monkeypatch):
    """Every iteration starts its fine-tuning from the base weights, not from the last model."""
    starts = []
    real = star.finetune

    def spy(qs, *args, **kwargs):
        starts.append(next(qs.base_model.parameters()).detach().clone())
        return real(qs, *args, **kwargs)

    monkeypatch.setattr(star, "finetune", spy)
    star.train_star(_cfg(), tmp_path / "run")
    assert len(starts) == 2 and torch.equal(starts[0], starts[1])


def test_resume_equals_uninterrupted(tmp_path, lenient):
    cfg = _cfg()
    star.train_star(cfg, tmp_path / "a")
    assert star.train_star(cfg, tmp_path / "b", stop_after=1)["stopped_at"] == 1
    star.train_star(cfg, tmp_path / "b", resume=True)

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
    qs = star.build_model(cfg, torch.device("cpu"))
    rows = [
        {"prompt": "Q: one plus one?\nA:", "target": " It is 2. The answer is 2."},
        {"prompt": "Q: a much longer question here?\nA:", "target": " 7."},
    ]
    ids, mask, cmask = star._batch(qs.tokenizer, rows, torch.device("cpu"))
    got = star.completion_loss(qs, ids, mask, cmask)
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

    def fake(qs, prompts, *args, **kwargs):
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
                out.append(f" We add it up. The answer is {q.answer}.")
        return out

    monkeypatch.setattr(star, "sample_rationales", fake)
    kept, figures = star.collect(None, cfg, questions, seed=0)
    assert figures["correct"] == 0 and figures["rationalized"] == 2 and figures["kept"] == 2
    assert all(
        r["rationalized"] and "Hint" not in r["prompt"] and "hint" not in r["target"] for r in kept
    )
    assert [r["id"] for r in kept] == [q.id for q in questions[1:]]


def test_bad_star_config_is_one_line():
    with pytest.raises(ValueError, match=r"star\.task must be one of"):
        load_run_config(_shipped(), ["star.task=mmlu"])
    with pytest.raises(ValueError, match=r"train\.method must be one of"):
        load_run_config(_shipped(), ["train.method=ppo"])
    with pytest.raises(ValueError, match=r"star\.step_growth"):
        load_run_config(_shipped(), ["star.step_growth=0.5"])


def test_iteration_steps_grow():
    cfg = _cfg("star.steps_per_iteration=10", "star.step_growth=1.2")
    assert [star._iteration_steps(cfg, n) for n in (1, 2, 3)] == [10, 12, 15]
