"""The fused, chunked head + cross-entropy against the unfused path, in fp64."""

from __future__ import annotations

import pytest
import torch

from qstar import QuietStar, QuietStarConfig
from qstar.core.head import linear_logprob, reference_logprob
from qstar.models.random import tiny_model

from .steps import step


@pytest.mark.parametrize("zero_rows", [False, True])  # rows without gradient are skipped
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logprob_equals_the_unfused_head_in_values_and_gradients(
    softcap, temperature, bias, zero_rows
):
    torch.manual_seed(0)
    N, H, V = 37, 16, 53
    h = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True) if bias else None
    targets = torch.randint(0, V, (N,))
    g = torch.randn(N, dtype=torch.float64)
    if zero_rows:
        g[::3] = 0.0
    inputs = [h, w] + ([b] if bias else [])
    got = linear_logprob(h, w, b, targets, temperature, softcap, chunk=5)  # 8 chunks, 2 rows left
    want = reference_logprob(h, w, b, targets, temperature, softcap)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    for a, r in zip(
        torch.autograd.grad((got * g).sum(), inputs),
        torch.autograd.grad((want * g).sum(), inputs),
        strict=True,
    ):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-12)


def _model(arch: str, mixing: str, overrides: dict, meta_in_the_middle: bool):
    model, tok = tiny_model(arch, dtype=torch.float64, **overrides)
    qs = QuietStar.from_base(model, tok, QuietStarConfig(thought_len=2, n_true=2, mixing=mixing))
    if meta_in_the_middle:  # the thought head then drops rows that are not the last ones
        qs.base_model.resize_token_embeddings(len(tok) + 5, mean_resizing=False)
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.5)
    return qs


TIED = {"tie_word_embeddings": True}
SOFTCAP = {"final_logit_softcapping": 30.0}


@pytest.mark.parametrize(
    "arch, mixing, overrides, middle",
    [
        ("llama", "hidden", TIED, False),  # the LM head is the embedding matrix
        ("llama", "logprob", {}, False),  # an untied head
        ("mistral", "hidden", {}, True),  # meta rows not the last ones: the head is a copy
        ("gemma3", "hidden", SOFTCAP, False),  # tied, final-logit softcapping
        ("gemma3", "logprob", SOFTCAP, True),
    ],
)
def test_training_forward_is_the_same_fused_and_unfused(arch, mixing, overrides, middle):
    """Every loss part, the rewards and every parameter's gradient, fused against off."""
    results = {}
    for mode in ("chunked", "off"):
        qs = _model(arch, mixing, overrides, middle)
        cfg = qs.base_model.config
        assert cfg.tie_word_embeddings == bool(
            overrides.get("tie_word_embeddings", arch == "gemma3")
        )
        qs.config = qs.config.replace(fused_ce=mode)
        ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(1))
        out = step(qs, ids, generator=torch.Generator().manual_seed(2))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in qs.named_parameters() if p.grad is not None}
        results[mode] = (out, grads)
    (a, ga), (b, gb) = results["chunked"], results["off"]
    for field in ("loss", "base_nll", "mixed_nll", "policy_loss", "rewards", "mixing_weight"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=1e-10, rtol=1e-10)
    assert ga.keys() == gb.keys() and len(ga) > 5
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-10, rtol=1e-9, msg=name)
    assert float(a.policy_loss) != 0.0  # rewards are nonzero: the policy term is exercised


def test_no_thought_baseline_is_the_same_fused_and_unfused():
    qs = _model("llama", "hidden", TIED, False)
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    values = []
    for mode in ("chunked", "off"):
        with qs.using(fused_ce=mode):
            values.append(float(step(qs, ids, think=False).loss.detach()))
    assert values[0] == pytest.approx(values[1], abs=1e-12)


def test_train_fused_ce_gives_the_same_run(tmp_path, tiny_run_config):
    """train.fused_ce=chunked reaches the model and changes no number of a (fp32) run."""
    from qstar.recipes.train import train
    from qstar.runs.tracking import read_metrics

    rows = {}
    for mode in ("off", "chunked"):
        train(
            tiny_run_config("train.steps=2", "eval.every=2", f"train.fused_ce={mode}"),
            tmp_path / mode,
        )
        rows[mode] = [
            r for r in read_metrics(tmp_path / mode / "metrics.jsonl") if r["kind"] == "train"
        ]
    # step 1 agrees to float precision; later steps drift at the noise the policy weight 1e6
    # magnifies (fp32 rewards differ in the last bits, so the updates do)
    for i, (a, b) in enumerate(zip(rows["off"], rows["chunked"], strict=True)):
        for key in ("loss", "base_nll", "mixed_nll", "policy_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5 if i == 0 else 1e-2, abs=1e-7), key


@pytest.mark.parametrize(
    "arch, mixing, overrides",
    [("llama", "hidden", TIED), ("llama", "logprob", {}), ("gemma3", "logprob", SOFTCAP)],
)
def test_fused_step_keeps_no_vocabulary_wide_tensor_of_every_row(
    arch, mixing, overrides, monkeypatch
):
    """What autograd saves for backward: with fused_ce=off the mixed logits of every row and
    depth are kept (``(Bk, n, L, V)`` elements or more); chunked keeps no ``(rows, V)`` tensor."""
    from qstar.core import head

    qs = _model(arch, mixing, overrides, False)
    V = qs.base_model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(head, "CHUNK_ELEMENTS", 8 * V)  # 8 rows a chunk
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    k, n = qs.config.n_thoughts, qs.config.n_true
    every_row = 2 * k * n * 9 * V
    largest = {}
    for mode in ("off", "chunked"):
        qs.config = qs.config.replace(fused_ce=mode)
        sizes = []

        def pack(x, sizes=sizes):
            sizes.append(x.numel() if x.shape and x.shape[-1] >= V - 2 else 0)
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            step(qs, ids, generator=torch.Generator().manual_seed(2)).loss.backward()
        largest[mode] = max(sizes)
    assert largest["off"] >= every_row
    assert largest["chunked"] == 0  # chunks' logits are recomputed in backward, never saved


@pytest.mark.parametrize(
    "arch, mixing, overrides",
    [("llama", "hidden", TIED), ("llama", "logprob", {}), ("gemma3", "logprob", SOFTCAP)],
)
def test_next_token_logprobs_equal_the_logits_they_replace(arch, mixing, overrides, monkeypatch):
    """Evaluation's fused path (held-out NLL) against log_softmax of the materialised logits."""
    from qstar.core import head
    from qstar.core.inference import next_token_logprobs

    qs = _model(arch, mixing, overrides, True).eval()
    V = qs.base_model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(head, "CHUNK_ELEMENTS", 5 * V)  # several chunks, a partial one
    ids = torch.randint(0, 200, (3, 11), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a padded row
    with torch.no_grad():
        for think, logits in (
            (True, qs.mixed_logits(ids, mask)),
            (False, qs.base_logits(ids, mask)),
        ):
            want = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
            got = next_token_logprobs(qs, ids, mask, think=think)
            assert got.shape == (3, 10)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
