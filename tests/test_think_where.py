"""Thinking at chosen positions (quiet_star.think_at): the thoughts are those of sequential
decoding and of the all-positions pass at the same positions, the step's numbers equal the
all-positions step's at those positions, fraction 1 is today's step bit for bit, the gate learns
from the measured gains, and bad settings fail with one line."""

from __future__ import annotations

import pytest
import torch

from qstar import ObjectiveConfig, QuietStar, QuietStarConfig
from qstar.core import hf, learn, think
from qstar.core.positions import choose, n_chosen
from qstar.models.random import tiny_model
from qstar.recipes.train import train

from .reference import sequential_thought


def _model(arch="llama", **kw):
    model, tok = tiny_model(arch)
    qs = QuietStar.from_base(model, tok, QuietStarConfig(thought_len=3, n_true=2, **kw))
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.5)
    return qs


def _ids(n=12, rows=2):
    return torch.randint(5, 250, (rows, n), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_thoughts_at_chosen_positions_equal_sequential_decoding(arch):
    qs = _model(arch)
    ids = _ids()
    positions = torch.tensor([[1, 4, 9], [0, 7, 10]])
    with torch.no_grad():
        _, cache = qs.base_pass(ids, None)
        got = qs.sample_from_cache(cache, ids.shape[1], 2, True, None, None, positions)
    for b in range(2):
        for r, p in enumerate(positions[b].tolist()):
            assert got[b, r].tolist() == sequential_thought(qs, ids[b], p), (b, p)


def test_sampled_thoughts_at_chosen_positions_equal_the_all_positions_pass():
    """With the same uniform draws the chosen columns' thoughts are the all-positions ones."""
    qs = _model()
    ids = _ids()
    L, t = ids.shape[1], qs.config.thought_len
    u = think.draw_uniforms((2, t, L), torch.Generator().manual_seed(3), "cpu")
    positions = torch.tensor([[2, 5, 8], [1, 3, 10]])
    with torch.no_grad():
        _, cache = qs.base_pass(ids, None)
        every = qs.sample_from_cache(hf.repeat_cache(cache, 1, True), L, 2, False, None, u)
        cols = torch.stack([u[b][:, positions[b]] for b in range(2)])  # (B, t, m)
        chosen = qs.sample_from_cache(cache, L, 2, False, None, cols, positions)
    for b in range(2):
        assert torch.equal(chosen[b], every[b, positions[b]])


def test_the_step_at_chosen_positions_is_the_all_positions_step_there():
    """Greedy thoughts: the mixed log-probabilities and the thoughts' own log-probabilities at
    the chosen positions equal the all-positions step's columns."""
    qs = _model()
    ids = _ids()
    full = qs(ids, greedy=True, policy_temperature=3.0)
    part = qs(ids, greedy=True, policy_temperature=3.0, think_at="hardest", think_fraction=0.4)
    pos = part.positions
    assert pos.shape == (2, n_chosen(12, 0.4))
    for b in range(2):
        p = pos[b]
        torch.testing.assert_close(part.lookahead_logprob[b], full.lookahead_logprob[b][:, p])
        torch.testing.assert_close(part.thought_logprob[b], full.thought_logprob[b][:, p])
        assert torch.equal(part.thoughts[b], full.thoughts[b][:, p])


def test_hardest_picks_the_highest_losses_and_random_is_seeded():
    valid = torch.ones(1, 6, dtype=torch.bool)
    nll = torch.tensor([[0.1, 3.0, 0.2, 2.0, 0.5]])
    assert choose("hardest", 0.4, valid, nll).tolist() == [[1, 3]]
    a = choose("random", 0.4, valid, generator=torch.Generator().manual_seed(1))
    b = choose("random", 0.4, valid, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    padded = torch.tensor([[True, True, True, False, False, False]])
    assert choose("hardest", 0.4, padded, torch.tensor([[0.1, 0.2, 9.0, 9.0, 9.0]])).tolist() == [
        [0, 1]
    ]


@pytest.mark.parametrize("mode", ["hardest", "random"])
def test_fraction_one_is_todays_step_bit_for_bit(mode):
    qs = _model()
    ids = _ids()
    a = learn.objective_loss(qs, ids, ObjectiveConfig(), generator=torch.Generator().manual_seed(0))
    obj = ObjectiveConfig(think_at=mode, think_fraction=1.0)
    b = learn.objective_loss(qs, ids, obj, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.loss, b.loss)


def test_the_gate_learns_the_measured_gain():
    qs = _model(gate=True)
    ids = _ids()
    opt = torch.optim.Adam(qs.gate_head.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        with torch.no_grad():
            o = qs(ids, greedy=True, think_at="gate", think_fraction=0.5)
        o.gate_score = qs.gate_head(qs.backbone_pass(ids).last_hidden_state.detach())
        loss = learn.gate_loss(o, -o.lookahead_logprob, learn.base_lookahead(o, o.base_logprob))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_a_run_thinks_at_a_fraction_and_resumes(tmp_path, tiny_run_config):
    cfg = tiny_run_config(
        "train.steps=4",
        "eval.every=2",
        "train.checkpoint_every=2",
        "quiet_star.gate=true",
        "quiet_star.think_at=gate",
        "quiet_star.think_fraction=0.25",
    )
    train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b", stop_after=2)
    train(cfg, tmp_path / "b", resume=True)
    import json

    def rows(d):
        skip = ("peak_mem_mb", "tokens_per_s")
        return [
            {k: v for k, v in json.loads(x).items() if not k.endswith("_s") and k not in skip}
            for x in (d / "metrics.jsonl").read_text().splitlines()
        ]

    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    assert any("gate_loss" in r for r in rows(tmp_path / "a"))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["quiet_star.think_fraction=0"], "think_fraction must be in"),
        (["quiet_star.think_fraction=1.5"], "think_fraction must be in"),
        (["quiet_star.think_at=gate"], "quiet_star.gate=true"),
        (["quiet_star.think_at=everywhere"], "think_at"),
    ],
)
def test_bad_settings_are_one_line(overrides, match, tiny_run_config):
    with pytest.raises(ValueError, match=match):
        tiny_run_config(*overrides)


def test_gated_generation_at_the_extremes_is_always_or_never_thinking():
    qs = _model(gate=True).eval()
    with torch.no_grad():
        qs.gate_head.net[-1].bias.fill_(0.3)  # every position predicts a gain of 0.3
    prompt = _ids(6, 1)
    always = qs.generate(prompt, max_new_tokens=5)
    never = qs.generate(prompt, max_new_tokens=5, think=False)
    stats: dict = {}
    assert torch.equal(
        qs.generate(prompt, max_new_tokens=5, think_threshold=0.2, stats=stats), always
    )
    assert stats == {"positions": 5, "thought": 5}
    assert torch.equal(qs.generate(prompt, max_new_tokens=5, think_threshold=0.5), never)
    with pytest.raises(ValueError, match="trained gate"):
        _model().generate(prompt, max_new_tokens=2, think_threshold=0.0)


def test_eval_refuses_a_threshold_without_thinking(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qstar.cli",
            "eval",
            "--model",
            "tiny:llama",
            "--tasks",
            "qstar_arith",
            "--no-think",
            "--think-threshold",
            "0.1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "--think-threshold" in out.stderr.strip().splitlines()[-1]


def test_a_thought_length_curriculum_reaches_the_steps(tmp_path, tiny_run_config):
    import json

    cfg = tiny_run_config("train.steps=4", "eval.every=4", "train.thought_len_schedule=4@0,2@3")
    train(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["thought_len"] for r in rows if r["kind"] == "train"] == [4, 4, 2, 2]
    with pytest.raises(ValueError, match="thought_len_schedule must look like"):
        tiny_run_config("train.thought_len_schedule=4-0")


def test_held_out_nll_thinking_where_the_gate_says(tmp_path):
    """The content control of a gated model adds `gated`: its own thought at the gate's top
    fraction of each window's positions (those `choose` picks in training), no thought elsewhere;
    at fraction 1 every position thinks, so it is the all-positions NLL."""
    from qstar.analysis.content import _content_tokens

    qs = _model(gate=True)
    torch.nn.init.normal_(qs.gate_head.net[-1].weight, std=1.0)
    qs.save_pretrained(tmp_path / "final")
    windows = _ids(12, rows=3).tolist()
    whole = _content_tokens(tmp_path / "final", windows, batch_size=2, fraction=1.0)
    for g, t in zip(whole["gated"], whole["thought"], strict=True):
        assert torch.equal(torch.from_numpy(g), torch.from_numpy(t))
    part = _content_tokens(tmp_path / "final", windows, batch_size=2, fraction=0.25)
    ids = torch.tensor(windows)
    with torch.no_grad():
        score = qs.gate_head(qs.backbone_pass(ids).last_hidden_state)
    chosen = choose("gate", 0.25, torch.ones_like(ids, dtype=torch.bool), gate_score=score)
    for w in range(3):
        expect = part["base"][w].copy()
        expect[chosen[w].numpy()] = part["thought"][w][chosen[w].numpy()]
        assert (part["gated"][w] == expect).all()
        assert (part["gated"][w] != part["base"][w]).sum() <= n_chosen(12, 0.25)
        assert torch.allclose(torch.from_numpy(part["gate"][w]).float(), score[w, :-1])
    plain = _model()
    plain.save_pretrained(tmp_path / "plain")
    assert "gated" not in _content_tokens(tmp_path / "plain", windows, batch_size=2)
