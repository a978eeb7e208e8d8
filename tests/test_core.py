"""Core parity and behaviour tests on tiny random models of five architectures."""

from __future__ import annotations

import pytest
import torch

from qstar import QuietStar, QuietStarConfig
from qstar.core.think import draw_uniforms
from qstar.models.random import ARCHITECTURES, tiny_model

from .reference import reference_loss, sequential_hidden, sequential_thought
from .steps import build_config, step

TEXT = "Q: What is 12 times 7?\nA: 84"


def build(arch="llama", seed=0, randomize_head=False, **cfg):
    model, tok = tiny_model(arch, seed=seed)
    defaults = dict(thought_len=3, n_true=2, n_thoughts=2)
    defaults.update(cfg)
    qcfg, objective = build_config(**defaults)
    qs = QuietStar.from_base(model, tok, qcfg)
    qs.test_objective = objective  # what step() trains with
    if randomize_head:  # a trained-looking head, so thoughts matter
        torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.5)
    return qs


def ids_of(qs, text=TEXT, max_len=12):
    return torch.tensor([qs.tokenizer.encode(text)[:max_len]])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_parallel_thoughts_equal_sequential_decoding(arch):
    qs = build(arch, thought_len=4)
    ids = ids_of(qs)
    par = qs.sample_thoughts(ids, greedy=True)  # (1, L, t)
    for i in range(ids.shape[1]):
        assert par[0, i].tolist() == sequential_thought(qs, ids[0], i), f"position {i}"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sampled_parallel_thoughts_equal_sequential_with_same_draws(arch):
    qs = build(arch, thought_len=4)
    ids = ids_of(qs)
    L, t = ids.shape[1], qs.config.thought_len
    par = qs.sample_thoughts(ids, generator=torch.Generator().manual_seed(3))
    u = draw_uniforms((1, t, L), torch.Generator().manual_seed(3), "cpu")
    for i in range(L):
        assert par[0, i].tolist() == sequential_thought(qs, ids[0], i, u[0, :, i]), f"position {i}"
    greedy = qs.sample_thoughts(ids, greedy=True)
    assert not torch.equal(par, greedy)  # the draws matter: this test can fail


def test_sliding_window_thoughts_equal_sequential():
    """A window smaller than prefix + thought exercises the window logic of both parts."""
    model, tok = tiny_model("gemma3", sliding_window=4)
    qs = QuietStar.from_base(model, tok, QuietStarConfig(thought_len=5, n_true=1, n_thoughts=1))
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.5)
    ids = ids_of(qs)
    par = qs.sample_thoughts(ids, greedy=True)
    for i in range(ids.shape[1]):
        assert par[0, i].tolist() == sequential_thought(qs, ids[0], i)
    ml = qs.mixed_logits(ids)
    with qs.using(attention="dense"):
        assert torch.allclose(ml, qs.mixed_logits(ids), atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mixed_logits_equal_sequential_reference(arch):
    qs = build(arch, randomize_head=True)
    ids = ids_of(qs, max_len=8)
    logits, thoughts = qs.mixed_logits(ids, return_thoughts=True)
    h_base = qs.backbone(inputs_embeds=qs.embed(ids)).last_hidden_state[0]
    for i in range(ids.shape[1]):
        h_end = sequential_hidden(qs, ids[0], i, thoughts[0, i].tolist(), 0)[0]
        w = qs.mixing_head(h_base[i], h_end)
        ref, _ = qs.mix_logits(w, h_base[i], h_end)
        torch.testing.assert_close(logits[0, i], ref, atol=2e-5, rtol=1e-4)


def test_fixed_thought_control_equals_sequential_reference():
    """The content control: every thought replaced by one token, scored as decoding would."""
    qs = build("llama", randomize_head=True)
    ids = ids_of(qs, max_len=8)
    token = qs.tokenizer.encode(qs.config.meta_init_text, add_special_tokens=False)[0]
    logits = qs.mixed_logits(ids, fixed_thought=token)
    h_base = qs.backbone(inputs_embeds=qs.embed(ids)).last_hidden_state[0]
    for i in range(ids.shape[1]):
        h_end = sequential_hidden(qs, ids[0], i, [token] * qs.config.thought_len, 0)[0]
        ref, _ = qs.mix_logits(qs.mixing_head(h_base[i], h_end), h_base[i], h_end)
        torch.testing.assert_close(logits[0, i], ref, atol=2e-5, rtol=1e-4)
    assert (logits - qs.mixed_logits(ids)).abs().max() > 1e-3  # content matters here


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "gemma3-window"])
def test_mixed_logits_at_few_positions_equal_the_full_computation(arch):
    """Evaluation thinks only where a token is scored; the rows equal the all-positions path
    (right-padded rows, repeated positions, and a sliding window shorter than prefix + thought)."""
    if arch == "gemma3-window":
        model, tok = tiny_model("gemma3", sliding_window=4)
        qs = QuietStar.from_base(model, tok, QuietStarConfig(thought_len=4, n_true=1))
        torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.5)
    else:
        qs = build(arch, randomize_head=True)
    ids = torch.cat([ids_of(qs), ids_of(qs, "The quick brown fox jumps over")], dim=0)
    L = ids.shape[1]
    mask = torch.ones_like(ids)
    mask[1, L - 3 :] = 0
    full = qs.mixed_logits(ids, mask)
    pos = torch.tensor([[0, 5, L - 1, L - 1], [2, 3, 4, L - 4]])
    got = qs.mixed_logits_at(ids, pos, mask)
    want = full.gather(1, pos[..., None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    base = qs.base_logits(ids, mask).gather(1, pos[..., None].expand(-1, -1, full.shape[-1]))
    assert (want - base).abs().max() > 1e-2  # the thoughts matter: this test can fail
    with pytest.raises(ValueError, match="positions"):
        qs.mixed_logits_at(ids, torch.tensor([[L], [0]]), mask)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("mixing", ["hidden", "logprob"])
def test_training_loss_equals_plain_reference(arch, mixing):
    """Every loss part of the batched forward equals the position-by-position definition."""
    qs = build(
        arch,
        randomize_head=True,
        mixing=mixing,
        n_true=3,
        reward_filter="all",
        policy_weight=10.0,
    )
    ids = torch.cat([ids_of(qs, max_len=7), ids_of(qs, "Language models can teach", max_len=7)])
    out = step(qs, ids, generator=torch.Generator().manual_seed(1))
    ref = reference_loss(qs, ids, out.thoughts, qs.test_objective)
    for name in ("base_nll", "mixed_nll", "policy_loss", "loss"):
        torch.testing.assert_close(
            getattr(out, name).float(), ref[name].float(), atol=1e-4, rtol=1e-4, msg=name
        )
    assert out.policy_loss.abs() > 0  # rewards are non-zero with a random head


@pytest.mark.parametrize(
    "baseline, reward_filter",
    [("leave_one_out", "all"), ("none", "all"), ("none", "positive"), ("mean", "best")],
)
def test_every_estimator_equals_plain_reference(baseline, reward_filter):
    """The policy term of each baseline x filter against the position-by-position definition
    (the reference's own per-position rewards), k = 3 so that leave-one-out and best differ
    from the mean baseline and the positive filter."""
    qs = build(
        "llama",
        randomize_head=True,
        n_true=3,
        n_thoughts=3,
        baseline=baseline,
        reward_filter=reward_filter,
        policy_weight=10.0,
    )
    ids = torch.cat([ids_of(qs, max_len=7), ids_of(qs, "Language models can teach", max_len=7)])
    out = step(qs, ids, generator=torch.Generator().manual_seed(1))
    ref = reference_loss(qs, ids, out.thoughts, qs.test_objective)
    for name in ("policy_loss", "loss"):
        torch.testing.assert_close(
            getattr(out, name).float(), ref[name].float(), atol=1e-4, rtol=1e-4, msg=name
        )
    assert out.policy_loss.abs() > 0


@pytest.mark.parametrize("kernel", ["sparse", "einsum"])  # on CPU, sparse = the fused kernel
def test_sparse_attention_equals_dense_path_values_and_gradients(kernel):
    grads = {}
    for mode in (kernel, "dense"):
        qs = build("qwen2", randomize_head=True, attention=mode, thought_len=5, n_true=3)
        ids = torch.cat([ids_of(qs, max_len=10), ids_of(qs, "The quick brown fox", max_len=10)])
        out = step(qs, ids, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        grads[mode] = (
            out,
            {n: p.grad.clone() for n, p in qs.named_parameters() if p.grad is not None},
        )
    (a, ga), (b, gb) = grads[kernel], grads["dense"]
    assert torch.equal(a.thoughts, b.thoughts)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    assert ga.keys() == gb.keys()
    for name in ga:  # the 1e6 policy weight scales gradients up: compare relative to their size
        scale = float(ga[name].abs().max())
        assert float((ga[name] - gb[name]).abs().max()) <= 5e-5 * scale + 1e-7, name


@pytest.mark.parametrize(
    "B, H, Hkv, L, nq, m, dtype, tol",
    [
        (2, 4, 2, 7, 3, 5, torch.float64, 1e-10),  # grouped-query heads, fewer query blocks
        (1, 4, 4, 16, 4, 4, torch.float32, 1e-5),
        (2, 6, 2, 9, 1, 3, torch.float32, 1e-5),
    ],
)
def test_fused_kernel_equals_einsum_kernel(B, H, Hkv, L, nq, m, dtype, tol):
    """The flash-prefix kernel joined through log-sum-exps, and its hand-written backward, against
    the einsum kernel (which autograd differentiates), in values and in all three gradients."""
    from qstar.core.attention import einsum_thought_attention, fused_thought_attention

    D = 8
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(B, h, n, D, dtype=dtype, generator=gen).requires_grad_()
        for h, n in ((H, nq * L), (Hkv, L + m * L), (Hkv, L + m * L))
    )
    grad = torch.randn(B, nq * L, H, D, dtype=dtype, generator=gen)
    if dtype == torch.float64:  # the einsum kernel computes its softmax in fp32: compare in fp64
        ref = _einsum_fp64(q, k, v, L, D**-0.5)
    else:
        ref = einsum_thought_attention(q, k, v, L, D**-0.5)
    out = fused_thought_attention(q, k, v, L, D**-0.5)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for a, b in zip(
        torch.autograd.grad(out, (q, k, v), grad),
        torch.autograd.grad(ref, (q, k, v), grad),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("kernel", ["sparse", "einsum"])
def test_training_step_under_bf16_autocast(kernel):
    """``train.precision=bf16-autocast`` (the default): mixed query/key dtypes reach the kernels."""
    losses = {}
    for mode in (kernel, "dense"):
        qs = build("llama", randomize_head=True, attention=mode, thought_len=3, n_true=2)
        ids = ids_of(qs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = step(qs, ids, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        grads = [p.grad for p in qs.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        losses[mode] = float(out.base_nll), float(out.mixed_nll)
    assert losses[kernel] == pytest.approx(losses["dense"], rel=2e-2)


@pytest.mark.parametrize("mixing", ["hidden", "logprob"])
def test_rewards_under_bf16_autocast_equal_fp32_rewards(mixing):
    """Early in training the mixing weight is ~1e-4: the reward (the difference between two
    thoughts' mixed predictions) must not drown in bf16 rounding. With the same thoughts, the
    rewards, the mixed NLL and the gain over the base model under autocast match fp32.
    (Before the fix, mixing in bf16 gave rewards many times their fp32 value: mostly noise.)"""
    qs = build("llama", thought_len=3, n_true=2, n_thoughts=2, mixing=mixing)
    with torch.no_grad():  # a head that has just left zero, as after a few steps
        qs.mixing_head.net[-1].weight.normal_(std=1e-4 if mixing == "hidden" else 0.0)
        qs.base_model.get_input_embeddings().weight.mul_(50)  # real models' hidden values: O(1)
    ids = torch.cat([ids_of(qs), ids_of(qs, "The quick brown fox jumps over the dog")])
    fixed = qs.sample_thoughts(
        ids.repeat_interleave(2, 0), generator=torch.Generator().manual_seed(0)
    )
    qs.sample_from_cache = lambda *a, **k: fixed  # the same thoughts in both precisions
    ref = step(qs, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = step(qs, ids)
    r_ref, r_got = ref.rewards, got.rewards
    assert r_ref.abs().max() > 0
    err = (r_got - r_ref).abs().mean() / r_ref.abs().mean()
    # measured: 20% after the fix (the bf16 trunk's own noise in the difference of two
    # thoughts' hidden states), 590% before it (the mixture rounded to bf16)
    assert err < 0.5, f"rewards under autocast are off by {err:.0%} of their size"
    assert float(got.mixed_nll) == pytest.approx(float(ref.mixed_nll), abs=2e-2)


def test_heldout_gain_is_exactly_zero_at_zero_mixing_weight_under_autocast():
    """Base and mixed logits go through the same fp32 head: no precision gap shows up as a gain."""
    qs = build("llama").eval()
    ids = ids_of(qs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(qs.mixed_logits(ids), qs.base_logits(ids))


def _einsum_fp64(q, k, v, L, scaling):
    """The thought layout by brute force in fp64: one masked softmax over all keys."""
    from qstar.core.attention import dense_thought_mask

    B, H, Q, D = q.shape
    m = (k.shape[2] - L) // L
    G = H // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    mask = dense_thought_mask(L, m, Q // L, torch.float64)
    probs = torch.softmax(q @ kk.transpose(-1, -2) * scaling + mask, dim=-1)
    return (probs @ vv).transpose(1, 2)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_zero_mixing_weight_reproduces_base_logits(arch):
    qs = build(arch)  # zero-initialised last layer
    ids = ids_of(qs)
    base = qs.base_model(input_ids=ids).logits
    torch.testing.assert_close(qs.mixed_logits(ids), base, atol=1e-5, rtol=1e-5)
    out = step(qs, ids, generator=torch.Generator().manual_seed(0))
    assert float(out.mixing_weight.abs().max()) == 0.0
    assert float(out.rewards.abs().max()) == 0.0


def test_logprob_mixing_at_zero_weight_is_base_distribution():
    from qstar.core.talk import mix_logprob

    h_b, h_t = torch.randn(3, 8), torch.randn(3, 8)
    head = torch.nn.Linear(8, 11)
    lp, w = mix_logprob(torch.full((3, 1), -1e4), h_b, h_t, head)
    torch.testing.assert_close(lp, torch.log_softmax(head(h_b), -1))
    assert float(w.max()) == 0.0


def test_gradients_reach_meta_tokens_mixing_head_and_lm_after_one_step():
    qs = build("llama", thought_len=3, n_true=2)
    ids = torch.cat([ids_of(qs), ids_of(qs, "The quick brown fox jumps")])[:, :10]
    opt = torch.optim.Adam(qs.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)

    step(qs, ids, generator=gen).loss.backward()
    # Step 0 (DESIGN.md): the zero last layer makes thoughts irrelevant.
    assert qs.meta_embeddings.grad is None or float(qs.meta_embeddings.grad.abs().sum()) == 0.0
    assert float(qs.mixing_head.net[-1].weight.grad.abs().sum()) > 0
    assert float(qs.base_model.get_output_embeddings().weight.grad.abs().sum()) > 0
    opt.step()
    opt.zero_grad()

    step(qs, ids, generator=gen).loss.backward()
    assert float(qs.meta_embeddings.grad.abs().sum()) > 0
    assert float(qs.mixing_head.net[0].weight.grad.abs().sum()) > 0
    assert float(qs.base_model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum()) > 0


def test_meta_tokens_learn_meta_scale_times_faster_under_adam():
    """Adam's first step moves each parameter by lr * sign(grad): the used embedding moves 100x lr."""
    qs = build("llama", thought_len=2, n_true=1)
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.5)
    ids = ids_of(qs)[:, :8]
    before = qs.embed(torch.tensor([[qs.start_id]]))[0, 0].detach().clone()
    lr = 1e-4
    opt = torch.optim.Adam([qs.meta_embeddings], lr=lr)
    step(qs, ids, generator=torch.Generator().manual_seed(0)).loss.backward()
    moved = qs.meta_embeddings.grad[0] != 0
    assert moved.any()
    opt.step()
    after = qs.embed(torch.tensor([[qs.start_id]]))[0, 0].detach()
    delta = (after - before)[moved].abs()
    torch.testing.assert_close(
        delta, torch.full_like(delta, lr * qs.config.meta_scale), rtol=1e-2, atol=0
    )


def test_loss_falls_on_a_fixed_batch():
    # policy_weight 1: the code's 1e6 is sized for lr 1e-6 and diverges at this test's lr.
    qs = build("llama", thought_len=2, n_true=2, policy_weight=1.0)
    qs.train()
    ids = torch.cat([ids_of(qs), ids_of(qs, "The quick brown fox jumps")])[:, :10]
    opt = torch.optim.AdamW(qs.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    first = None
    for _ in range(20):
        out = step(qs, ids, generator=gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first or out.stats()
    last = step(qs, ids, generator=gen).stats()
    assert last["base_nll"] < first["base_nll"] - 1.0
    assert last["mixed_nll"] < first["mixed_nll"] - 1.0
    assert last["loss"] < first["loss"]


def test_save_and_load_give_the_same_outputs(tmp_path):
    qs = build("mistral", randomize_head=True)
    with torch.no_grad():
        qs.meta_embeddings.add_(torch.randn_like(qs.meta_embeddings) * 0.01)  # trained meta tokens
    ids = ids_of(qs)
    before = qs.mixed_logits(ids)
    loss_before = step(qs, ids, generator=torch.Generator().manual_seed(0)).loss
    qs.save_pretrained(tmp_path / "ckpt")
    loaded = QuietStar.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == qs.config
    torch.testing.assert_close(loaded.meta_embeddings, qs.meta_embeddings)
    torch.testing.assert_close(loaded.mixed_logits(ids), before)
    again = step(loaded, ids, qs.test_objective, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.loss, loss_before)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_right_padded_batch_gives_each_row_its_own_results(arch):
    qs = build(arch, randomize_head=True, n_thoughts=1)
    a = ids_of(qs, max_len=12)
    b = ids_of(qs, "The quick brown fox", max_len=7)
    pad = torch.full((1, a.shape[1] - b.shape[1]), qs.tokenizer.pad_token_id)
    batch = torch.cat([a, torch.cat([b, pad], 1)])
    mask = torch.cat(
        [torch.ones_like(a), torch.cat([torch.ones_like(b), torch.zeros_like(pad)], 1)]
    )
    logits = qs.mixed_logits(batch, attention_mask=mask)
    out = qs(batch, attention_mask=mask, greedy=True)
    for row, alone in enumerate([a, b]):
        n = alone.shape[1]
        torch.testing.assert_close(logits[row, :n], qs.mixed_logits(alone)[0], atol=2e-5, rtol=1e-4)
        single = qs(alone, greedy=True)
        assert torch.equal(out.thoughts[row, :, :n], single.thoughts[0])
        ok = single.target_valid[0].expand_as(single.mixing_weight[0])
        torch.testing.assert_close(
            out.mixing_weight[row, :, :n][ok], single.mixing_weight[0][ok], atol=2e-5, rtol=1e-4
        )
        assert torch.equal(out.target_valid[row, :, :n], single.target_valid[0])


def test_left_padding_and_overlong_inputs_are_rejected():
    qs = build("gpt2")
    ids = ids_of(qs)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="right-padded"):
        qs(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="positions"):
        qs(torch.zeros((1, 255), dtype=torch.long))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_flex_attention_kernel_equals_einsum_kernel(arch):
    """FlexAttention with the thought block mask (the CUDA path) gives the same logits."""
    import warnings

    out = {}
    for mode in ("einsum", "flex"):
        qs = build(arch, randomize_head=True, attention=mode, thought_len=3)
        ids = torch.cat([ids_of(qs, max_len=10), ids_of(qs, "The quick brown fox", max_len=10)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # uncompiled flex_attention warns on CPU
            out[mode] = qs.mixed_logits(ids)
    torch.testing.assert_close(out["flex"], out["einsum"], atol=1e-5, rtol=1e-5)
    qs = build(arch, attention="flex")
    with pytest.raises(ValueError, match="no backward on CPU"):
        qs(ids_of(qs))


def test_activation_memory_grows_linearly_with_thought_length():
    """Thoughts are sampled without gradient and recomputed in one pass: the bytes saved for
    backward grow by the same amount per extra thought token (the fused CPU kernel keeps no
    scores; measured: equal increments), while the dense-mask path's increment grows (its masked
    scores over all earlier depths are quadratic in depth; measured: +67% from 2 to 14 tokens)."""
    from qstar.analysis.bench_memory import saved_activation_bytes

    ids = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(0))
    saved = {"sparse": [], "dense": []}
    lengths = (2, 6, 10, 14)
    for t in lengths:
        qs = QuietStar.from_base(*tiny_model("llama"), QuietStarConfig(thought_len=t, n_true=2))
        for attention in saved:
            with qs.using(attention=attention), saved_activation_bytes() as acc:
                qs(ids, generator=torch.Generator().manual_seed(0))
            saved[attention].append(acc["bytes"])
    steps = {a: [b - a_ for a_, b in zip(v, v[1:], strict=False)] for a, v in saved.items()}
    fast, dense = steps["sparse"], steps["dense"]
    assert fast[-1] / fast[0] < 1.02, fast  # linear: equal increments (the fused kernel)
    assert dense[-1] / dense[0] > 1.3, dense  # the dense masks' quadratic term
    assert saved["dense"][-1] > 1.5 * saved["sparse"][-1]


def test_peak_rss_is_measured_in_a_fresh_process():
    """`qstar bench`'s peak-RSS columns: each step runs in its own process, so the figure is
    that step's alone; a Quiet-STaR step (k thoughts of t + 2 + n passes) needs more than the
    plain step on the same k sequences, and both need more than nothing."""
    from qstar.analysis.bench_memory import peak_rss_increase

    plain = peak_rss_increase("plain", "tiny", 64, 4, 2, 2, 1, processes=1)
    if plain is None:
        pytest.skip("no /proc: resident memory is not measured on this platform")
    fast = peak_rss_increase("fast", "tiny", 64, 4, 2, 2, 1, processes=1)
    assert 0 < plain < fast, (plain, fast)


def test_bench_times_the_fused_and_unfused_step_side_by_side(tmp_path):
    """`qstar bench --fused-ce chunked`: the unfused step is timed in the same loop and its
    columns reach the table; the fused step keeps fewer activation bytes than the unfused one."""
    from qstar.analysis import bench

    rows = bench.run(
        sizes=("tiny",), lengths=(32,), configs=((2, 2),), repeats=1, skip_dense=True,
        out=tmp_path, rss=False, fused_ce="chunked", device="cpu",
    )  # fmt: skip
    (row,) = rows
    assert row["unfused_s"] > 0 and row["unfused_over_fast"] > 0
    assert row["act_mb_fast"] < row["act_mb_unfused"]
    table = (tmp_path / "bench.md").read_text()
    assert "unfused/fast" in table and "`fused_ce: chunked`" in table


def test_eval_bench_scores_the_same_through_both_paths(tmp_path):
    """`qstar bench --eval`: the fused and the materialised scoring agree (fp32) and the table
    is written."""
    from qstar.analysis import bench_eval

    (row,) = bench_eval.run(
        sizes=("tiny",), lengths=(16,), batch=2, repeats=1, rss=False, out=tmp_path
    )
    assert row["max_abs_diff"] < 1e-4 and row["fused_s"] > 0 and row["logits_s"] > 0
    assert "| tiny | 16 | 2 |" in (tmp_path / "eval.md").read_text()


def test_config_is_frozen_and_using_restores_it():
    """Temporary changes go through `using` (validated, restored even on error), so a shared
    model is never left modified; the meta tokens belong to the weights and cannot change."""
    import dataclasses

    qs = build("llama", thought_len=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        qs.config.thought_len = 5
    ids = ids_of(qs)
    with qs.using(thought_len=5, attention="dense"):
        assert qs.sample_thoughts(ids, greedy=True).shape[-1] == 5
    assert (qs.config.thought_len, qs.config.attention) == (3, "sparse")
    with pytest.raises(RuntimeError), qs.using(mixing="logprob"):
        assert qs.config.mixing == "logprob"
        raise RuntimeError("inside the block")
    assert qs.config.mixing == "hidden"
    with pytest.raises(ValueError, match="thought_len"), qs.using(thought_len=0):
        pass
    with pytest.raises(ValueError, match="start_token"), qs.using(start_token="<x>"):
        pass


def test_eval_backend_thought_len_override_does_not_leak():
    from qstar.evaluation.backend import QStarLM

    qs = build("llama", thought_len=3, randomize_head=True)
    lm = QStarLM(model=qs, thought_len=5, batch_size=2)
    lm._logprobs([[5, 6, 7, 8]], [1])
    assert qs.config.thought_len == 3


def test_bench_default_size_is_the_default_model_with_its_own_tokenizer(monkeypatch):
    """`qstar bench --sizes default` times the default model (loaded as `qstar train` loads it)
    with that model's tokenizer; the named sizes stay random models with the test tokenizer."""
    from qstar.analysis import bench_step
    from qstar.models import loading

    calls = []
    monkeypatch.setattr(loading, "load_model", lambda dtype: calls.append(dtype) or ("M", "T"))
    assert bench_step._bench_model("default", torch.float32, "tiny-tok") == ("M", "T")
    assert calls == [torch.float32]
    model, tok = bench_step._bench_model("tiny", torch.float32, "tiny-tok")
    assert tok == "tiny-tok" and model.config.hidden_size == 256
