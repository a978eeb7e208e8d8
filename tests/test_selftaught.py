"""The STaR family's math (qstar.core.selftaught): completion log-probabilities against a
token-by-token reference, TRICE's control variate and surrogate by hand and its unbiasedness by
Monte Carlo, DPO by hand (and against TRL where installed), best-of-k by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from qstar.core import selftaught as st

# ---------------------------------------------------------------------------------------------
# completion log-probability and STaR's NLL


def _reference_completion_logprob(logits, ids, mask):
    """Token by token: sum over completion tokens t of log_softmax(logits[b, t-1])[ids[b, t]]."""
    out = []
    for b in range(ids.shape[0]):
        total = 0.0
        for t in range(1, ids.shape[1]):
            if mask[b, t]:
                total += torch.log_softmax(logits[b, t - 1].double(), -1)[ids[b, t]].item()
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def test_completion_logprob_equals_a_token_by_token_reference():
    B, L, V = 3, 6, 7
    logits = torch.randn(B, L, V) * 3
    ids = torch.randint(0, V, (B, L))
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 0],  # prompt of 2, completion of 3, one pad
            [0, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 0],  # no completion: 0
        ],
        dtype=torch.bool,
    )
    got = st.completion_logprob(logits, ids, mask)
    want = _reference_completion_logprob(logits, ids, mask)
    assert got.shape == (B,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert got[2].item() == 0.0
    # STaR's loss: the mean NLL over the 3 + 5 completion tokens of the batch
    nll = st.completion_nll(logits, ids, mask)
    torch.testing.assert_close(nll.double(), -want.sum() / 8, atol=1e-5, rtol=1e-5)


def test_completion_logprob_is_fp32_from_bf16_logits_and_has_grad():
    logits = torch.randn(2, 4, 5).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    got = st.completion_logprob(logits, ids, mask)
    assert got.dtype == torch.float32
    want = _reference_completion_logprob(logits.detach().float(), ids, mask)
    torch.testing.assert_close(got.detach().double(), want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    # the logits at the last position predict nothing, those before a non-completion token neither
    assert logits.grad[:, -1].abs().sum() == 0 and logits.grad[1, 2].abs().sum() == 0
    assert logits.grad[1, 1].abs().sum() > 0


def test_completion_nll_of_an_empty_mask_is_zero_and_bad_masks_are_refused():
    logits, ids = torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.long)
    assert st.completion_nll(logits, ids, torch.zeros(1, 3, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="token 0"):
        st.completion_logprob(logits, ids, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="completion_mask must be"):
        st.completion_logprob(logits, ids, torch.ones(1, 2, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# TRICE

# B = 4 questions, one of each kind:
#   q0: memory correct, proposal correct   -> accepted: memory = proposal   c=1 m=1
#   q1: memory correct, proposal wrong     -> memory kept                   c=0 m=1
#   q2: no correct memory, proposal wrong  -> adds nothing                  c=0 m=0
#   q3: no correct memory, proposal correct-> accepted                      c=1 m=1
C = torch.tensor([True, False, False, True])
M = torch.tensor([True, True, False, True])
# sum c = 2, sum m = 3, so beta_i = (2 - c_i) / (3 - 1) on contributing questions:
#   beta = (1/2, 2/2, 0 [m=0], 1/2)
BETA = [0.5, 1.0, 0.0, 0.5]


def test_trice_control_variate_by_hand():
    beta = st.trice_control_variate(C, M)
    assert beta.tolist() == BETA and beta.dtype == torch.float32


def test_trice_surrogate_gradient_is_the_hand_computed_estimator():
    # q0, q3 accepted: memory log-prob = proposal log-prob; q2 has no memory at all (-inf)
    logp_memory = torch.tensor([-1.0, -2.0, -math.inf, -4.0], requires_grad=True)
    logp_proposal = torch.tensor([-1.0, -5.0, -6.0, -4.0], requires_grad=True)
    s = st.trice_surrogate(logp_memory, logp_proposal, C, M)
    # d/d logp_memory = m_i / B; d/d logp_proposal = -m_i beta_i / B
    g_mem, g_prop = torch.autograd.grad(s, (logp_memory, logp_proposal))
    assert g_mem.tolist() == [0.25, 0.25, 0.0, 0.25]
    assert g_prop.tolist() == [-0.125, -0.25, 0.0, -0.125]
    # value: (1/4) [(-1 + 0.5) + (-2 + 5) + 0 + (-4 + 2)] = 0.5 / 4
    assert s.item() == 0.125


def test_trice_surrogate_where_the_memory_is_the_accepted_proposal():
    """Built as the caller would (memory <- proposal where correct) from one tensor of proposal
    log-probs: an accepted proposal gets (1 - beta_i) m_i / B, a rejected one -beta_i m_i / B."""
    proposal = torch.tensor([-1.0, -5.0, -6.0, -4.0], requires_grad=True)
    old_memory = torch.tensor([-3.0, -2.0, -7.0, -9.0], requires_grad=True)
    memory = torch.where(C, proposal, old_memory)
    (g_prop, g_old) = torch.autograd.grad(
        st.trice_surrogate(memory, proposal, C, M), (proposal, old_memory)
    )
    assert g_prop.tolist() == [(1 - 0.5) / 4, -1.0 / 4, 0.0, (1 - 0.5) / 4]
    assert g_old.tolist() == [0.0, 0.25, 0.0, 0.0]


def test_trice_control_variate_needs_another_contributing_question():
    # a single contributing question: sum m - 1 = 0, no other question to estimate from
    assert st.trice_control_variate(
        torch.tensor([False, True, False]), torch.tensor([False, True, False])
    ).tolist() == [0.0, 0.0, 0.0]
    assert st.trice_control_variate(
        torch.tensor([False, False, False]), torch.tensor([True, False, False])
    ).tolist() == [0.0, 0.0, 0.0]
    # two contributing: each sees only the other
    assert st.trice_control_variate(
        torch.tensor([True, False, False]), torch.tensor([True, True, False])
    ).tolist() == [0.0, 1.0, 0.0]


def test_trice_no_contributing_question_gives_zero_loss_and_zero_gradient():
    none = torch.zeros(3, dtype=torch.bool)
    assert st.trice_control_variate(none, none).tolist() == [0.0, 0.0, 0.0]
    lm = torch.tensor([-math.inf, math.nan, -2.0], requires_grad=True)
    lp = torch.tensor([-1.0, -3.0, -2.0], requires_grad=True)
    s = st.trice_surrogate(lm, lp, none, none)
    assert s.item() == 0.0
    g_mem, g_prop = torch.autograd.grad(s, (lm, lp))
    assert g_mem.tolist() == [0.0, 0.0, 0.0] and g_prop.tolist() == [0.0, 0.0, 0.0]


def test_trice_refuses_a_correct_proposal_that_does_not_contribute():
    with pytest.raises(ValueError, match="must contribute"):
        st.trice_control_variate(torch.tensor([True, False]), torch.tensor([False, True]))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        st.trice_surrogate(torch.zeros(3), torch.zeros(2), C[:2], M[:2])


def test_trice_is_unbiased_on_a_toy_latent_rationale_model():
    """p(z | x) = softmax(theta) over 4 rationales, of which {0, 2} give the correct answer.
    With every memory a posterior sample (TRICE's stationary state) and proposals from the
    model, the surrogate's gradient averages to grad log p(correct) = q - p (q: the posterior,
    p restricted to {0, 2} and renormalised) within 4 standard errors; putting the control
    variate on the memory instead of the proposal would average to -E[beta] (q - p)."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.tensor([0.2, 0.5, -0.3, 0.1], dtype=torch.float64)
    p = torch.softmax(theta, 0)
    good = torch.tensor([True, False, True, False])
    q = torch.where(good, p, 0.0) / p[good].sum()
    exact = q - p
    draws, B = 3000, 4
    memory0 = torch.multinomial(q, draws * B, replacement=True, generator=gen).view(draws, B)
    proposal = torch.multinomial(p, draws * B, replacement=True, generator=gen).view(draws, B)
    correct = good[proposal]
    memory = torch.where(correct, proposal, memory0)  # the update: accept correct proposals
    contributes = torch.ones(draws, B, dtype=torch.bool)
    logp = torch.log(p)
    lm = logp[memory].requires_grad_()
    lp = logp[proposal].requires_grad_()
    total = sum(st.trice_surrogate(lm[d], lp[d], correct[d], contributes[d]) for d in range(draws))
    g_mem, g_prop = torch.autograd.grad(total, (lm, lp))  # (draws, B) coefficients
    # grad_theta log p(z) = onehot(z) - p, so each draw's gradient, explicitly:
    onehot = torch.nn.functional.one_hot
    per_draw = (
        g_mem[..., None] * (onehot(memory, 4) - p) + g_prop[..., None] * (onehot(proposal, 4) - p)
    ).sum(1)  # (draws, 4)
    mean, se = per_draw.mean(0), per_draw.std(0) / draws**0.5
    assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)
    # and it has the power to tell the swapped estimator (E = -E[beta] (q - p), E[beta] = P(good))
    swapped = -p[good].sum() * exact
    assert ((mean - swapped).abs() > 4 * se).any()


# ---------------------------------------------------------------------------------------------
# DPO and V-STaR's verifier

# a toy batch of B = 2 pairs, beta = 0.1
PC = [-1.0, -3.0]  # policy, chosen
PR = [-2.0, -2.0]  # policy, rejected
RC = [-1.5, -2.0]  # reference, chosen
RR = [-1.5, -2.5]  # reference, rejected
# pair 0: (pc - rc) - (pr - rr) = 0.5 - (-0.5) = 1.0  -> loss log(1 + e^-0.1)  = 0.6443966600735709
# pair 1: (pc - rc) - (pr - rr) = -1.0 - 0.5 = -1.5  -> loss log(1 + e^0.15)  = 0.770957047789532
DPO_LOSS = (0.6443966600735709 + 0.770957047789532) / 2  # 0.7076768539315514


def _toy(requires_grad=False):
    return [
        torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad) for v in (PC, PR, RC, RR)
    ]


def test_dpo_loss_by_hand():
    loss, chosen, rejected = st.dpo_loss(*_toy(), beta=0.1)
    assert loss.item() == pytest.approx(DPO_LOSS, abs=1e-12)
    # rewards beta * (policy - ref): chosen (0.05, -0.1), rejected (-0.05, 0.05)
    assert chosen.tolist() == pytest.approx([0.05, -0.1], abs=1e-12)
    assert rejected.tolist() == pytest.approx([-0.05, 0.05], abs=1e-12)
    assert not chosen.requires_grad and not rejected.requires_grad


def test_dpo_gradient_sign_raising_the_chosen_lowers_the_loss():
    pc, pr, rc, rr = _toy(requires_grad=True)
    loss, chosen, _ = st.dpo_loss(pc, pr, rc, rr, beta=0.1)
    g_pc, g_pr = torch.autograd.grad(loss, (pc, pr))
    # dL/dpc_b = -beta sigmoid(-z_b) / B with z = (0.1, -0.15): sigmoid(-z) = (0.47502, 0.53743)
    assert g_pc.tolist() == pytest.approx(
        [-0.1 * 0.47502081252106 / 2, -0.1 * 0.5374298453437496 / 2]
    )
    assert (g_pc < 0).all() and (g_pr > 0).all()
    assert not chosen.requires_grad
    # and a step along it: raising the chosen log-probs lowers the loss
    raised, *_ = st.dpo_loss(pc.detach() + 0.5, *_toy()[1:], beta=0.1)
    assert raised.item() < loss.item()


def test_dpo_refuses_mismatched_shapes():
    pc, pr, rc, rr = _toy()
    with pytest.raises(ValueError, match="one shape"):
        st.dpo_loss(pc[:, None], pr, rc, rr)  # (B, 1) against (B,) would broadcast to (B, B)


def test_dpo_loss_equals_trl_on_the_toy_batch():
    trl = pytest.importorskip("trl")
    from trl import DPOTrainer

    if not hasattr(DPOTrainer, "dpo_loss"):
        pytest.skip(f"trl {trl.__version__} has no DPOTrainer.dpo_loss over log-probs (< 0.29 has)")
    # dpo_loss reads only these attributes of the trainer on the sigmoid path
    trainer = SimpleNamespace(
        beta=0.1,
        loss_type="sigmoid",
        label_smoothing=0.0,
        reference_free=False,
        f_divergence_type="reverse_kl",
        f_divergence_params=None,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
        args=SimpleNamespace(discopop_tau=0.05),
    )
    losses, chosen, rejected = DPOTrainer.dpo_loss(trainer, *_toy())
    loss, our_chosen, our_rejected = st.dpo_loss(*_toy(), beta=0.1)
    torch.testing.assert_close(losses.mean(), loss)
    torch.testing.assert_close(chosen, our_chosen)
    torch.testing.assert_close(rejected, our_rejected)


def test_verifier_score_is_the_dpo_implicit_reward():
    policy = torch.tensor([[-3.0, -5.0], [-2.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-4.0, -4.0], [-2.0, -3.0]])
    score = st.verifier_score(policy, ref, beta=0.5)
    assert score.tolist() == [[0.5, -0.5], [0.0, 1.0]] and not score.requires_grad
    _, chosen, _ = st.dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=0.5)
    assert chosen.tolist() == score[:, 0].tolist()


def test_best_of_k_by_hand():
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.5],  # picks 1: correct
            [0.7, 0.7, 0.2],  # tie: picks the first (0): wrong
            [-1.0, -2.0, -3.0],  # picks 0: correct
        ]
    )
    correct = torch.tensor([[False, True, False], [False, True, True], [True, False, False]])
    assert st.best_of_k(scores, correct) == pytest.approx(2 / 3)
    # negated, the lowest score wins: picks 0 (wrong), 2 (correct), 2 (wrong)
    assert st.best_of_k(-scores, correct) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="NaN"):
        st.best_of_k(torch.tensor([[math.nan, 1.0]]), torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match=r"\(N, k\)"):
        st.best_of_k(scores, correct[:, :2])
