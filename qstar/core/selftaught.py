"""Self-taught reasoning: the math of the STaR family as pure functions over tensors.

Notation: ``B`` sequences (questions, or preference pairs), ``L`` tokens, ``V`` vocabulary,
``N`` questions with ``k`` candidate solutions each. A *rationale* is the chain of thought a
model writes before its answer; *correct* means its final answer matches the reference.

STaR (Zelikman et al. 2022, "STaR: Bootstrapping Reasoning With Reasoning"). Sample a rationale
for every training question, keep only those whose answer comes out correct (for the failures,
optionally a *rationalization*: a rationale written with the answer given as a hint), fine-tune
on the kept ones with the ordinary language-modelling loss over the rationale and answer, the
question's tokens masked out, and repeat from the base model. That loss is
:func:`completion_nll`; :func:`completion_logprob` is the per-sequence log-probability the other
methods score rationales with.

TRICE (Hoffman et al. 2023, "Training Chain-of-Thought via Latent-Variable Inference"). Treats
the rationale ``z`` as a latent variable and maximises the marginal likelihood of the correct
answer, ``log p(y | x) = log sum_z p(z | x) 1[answer(z) = y]``, whose gradient is the posterior
expectation ``E_{p(z | x, y)}[grad log p(z | x)]``. It estimates that expectation by MCMC-EM:
each question keeps a *memory* holding one correct rationale; at every step a fresh rationale
is proposed from the current model and, if its answer is correct, replaces the memory (an
independence sampler whose stationary law is the posterior). The score of the proposal, whose
expectation under the model is zero, serves as a control variate, scaled by a leave-one-out
estimate of the acceptance rate over the rest of the batch: :func:`trice_control_variate`,
:func:`trice_surrogate`.

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model"). Fits a policy to pairwise preferences without a separate reward model: the
implicit reward of a completion is ``beta * log(pi(y | x) / pi_ref(y | x))`` and the loss is the
Bradley-Terry negative log-likelihood that the chosen completion out-scores the rejected one:
:func:`dpo_loss`.

V-STaR (Hosseini et al. 2024, "V-STaR: Training Verifiers for Self-Taught Reasoners"). STaR
throws its incorrect samples away; V-STaR keeps them and trains a *verifier* with DPO on
(correct, incorrect) pairs of solutions to the same question. At test time the generator
samples ``k`` candidates per question and the verifier picks the one with the highest score,
the DPO implicit reward: :func:`verifier_score`, :func:`best_of_k`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qstar.core.learn import logprob_of, masked_mean

# ---------------------------------------------------------------------------------------------
# STaR: log-probability of a completion (rationale + answer) given its prompt


def _completion_token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(x_t | x_<t)`` of every completion token and the target mask: ``(B, L-1)`` each.

    Token ``t`` is predicted by the logits at ``t - 1``, so the targets are ``input_ids[:, 1:]``
    and the mask is ``completion_mask[:, 1:]``.
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits must be (B, L, V) over input_ids (B, L); got {tuple(logits.shape)} and "
            f"{tuple(input_ids.shape)}"
        )
    if completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"completion_mask must be (B, L) like input_ids {tuple(input_ids.shape)}, got "
            f"{tuple(completion_mask.shape)}"
        )
    completion_mask = completion_mask.bool()
    if completion_mask[:, 0].any():
        raise ValueError(
            "completion_mask marks token 0, which no logit predicts; a completion must follow "
            "at least one prompt token"
        )
    lp = logprob_of(logits[:, :-1], input_ids[:, 1:])  # (B, L-1) fp32
    return lp, completion_mask[:, 1:]


def completion_logprob(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Summed log-probability of each sequence's completion tokens, in fp32.

    Args:
        logits: ``(B, L, V)`` from a causal LM over ``input_ids``.
        input_ids: ``(B, L)``.
        completion_mask: ``(B, L)`` bool, True on the completion's tokens of ``input_ids``
            (rationale and answer; False on the prompt and on padding). Token ``t`` is scored
            by the logits at ``t - 1``, so token 0 may not be marked.
    Returns:
        ``(B,)`` ``sum_{t in completion} log p(x_t | x_<t)``; 0 for an empty completion.
    """
    lp, mask = _completion_token_logprobs(logits, input_ids, completion_mask)
    return torch.where(mask, lp, 0.0).sum(dim=-1)


def completion_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """STaR's fine-tuning loss (Zelikman et al. 2022): the NLL per completion token, averaged
    over all completion tokens of the batch (prompt tokens masked out), in fp32.

    Arguments as :func:`completion_logprob`. Returns ``()``; 0 when no token is marked.
    """
    lp, mask = _completion_token_logprobs(logits, input_ids, completion_mask)
    return masked_mean(-lp, mask)


# ---------------------------------------------------------------------------------------------
# TRICE: the latent-rationale gradient with a leave-one-out control variate


def _check_trice_masks(correct: torch.Tensor, contributes: torch.Tensor) -> None:
    if correct.dim() != 1 or correct.shape != contributes.shape:
        raise ValueError(
            f"correct and contributes must both be (B,); got {tuple(correct.shape)} and "
            f"{tuple(contributes.shape)}"
        )
    if (correct.bool() & ~contributes.bool()).any():
        raise ValueError(
            "a question whose proposal is correct must contribute (its proposal enters memory): "
            "pass contributes = memory_was_correct | correct"
        )


def trice_control_variate(correct: torch.Tensor, contributes: torch.Tensor) -> torch.Tensor:
    """TRICE's control-variate scale (Hoffman et al. 2023): the leave-one-out acceptance rate

        ``beta_i = (sum_j c_j - c_i) / (sum_j m_j - 1)``

    the fraction of the *other* contributing questions whose proposal was correct (a correct
    proposal always contributes, so ``sum_j c_j`` counts contributing questions only).

    Args:
        correct: ``(B,)`` bool ``c``: the proposal sampled this step has a correct answer.
        contributes: ``(B,)`` bool ``m``: the memory after the update holds a correct rationale
            (it did before, or the proposal was correct and accepted).
    Returns:
        ``(B,)`` fp32, detached. 0 where ``m_i = 0`` (the question adds nothing) and everywhere
        when fewer than two questions contribute (``sum_j m_j - 1 <= 0``: no other question to
        estimate the rate from, so no control variate).
    """
    _check_trice_masks(correct, contributes)
    c = correct.detach().to(torch.float32)
    m = contributes.detach().to(torch.float32)
    others = m.sum() - 1
    beta = (c.sum() - c) / others.clamp(min=1)
    return torch.where(contributes.bool() & (others > 0), beta, 0.0)


def trice_surrogate(
    logp_memory: torch.Tensor,
    logp_proposal: torch.Tensor,
    correct: torch.Tensor,
    contributes: torch.Tensor,
) -> torch.Tensor:
    """A scalar whose gradient is TRICE's estimate of ``grad (1/B) sum_i log p(y_i | x_i)``
    (Hoffman et al. 2023, Algorithm 1 with the leave-one-out control variate):

        ``(1/B) sum_i m_i [grad log p(r_i | x_i) - beta_i grad log p(z'_i | x_i)]``

    with ``beta`` from :func:`trice_control_variate` and ``m``, ``beta`` held constant. It is an
    objective to *maximise*: as a loss, minimise ``-trice_surrogate(...)``.

    Which rationale goes where: the first term is the rationale in memory *after* this step's
    update, ``r_i``; the control variate is the score of this step's proposal ``z'_i``. Where
    the proposal was accepted (``c_i = 1``) the memory *is* the proposal, so pass the same
    log-probability in both (the question then gets ``(1 - beta_i) m_i / B``). The control
    variate must be the proposal's: ``z'_i`` is drawn from ``p(z | x_i)``, so its score has
    expectation zero and the estimate stays unbiased; putting ``beta_i`` on the memory's score
    instead would scale the gradient by ``-E[beta]``.

    Args:
        logp_memory: ``(B,)`` ``log p(r_i | x_i)`` of the memory rationale after the update (e.g.
            :func:`completion_logprob` over its tokens), with grad. Ignored where ``m_i = 0``,
            so any value (even -inf) may stand for a question with no correct rationale.
        logp_proposal: ``(B,)`` ``log p(z'_i | x_i)`` of this step's proposal, with grad.
        correct: ``(B,)`` bool ``c_i``: the proposal's answer is correct.
        contributes: ``(B,)`` bool ``m_i``: the memory (after the update) is correct.
    Returns:
        ``()``; its value is only meaningful through its gradient.
    """
    if logp_memory.shape != correct.shape or logp_proposal.shape != correct.shape:
        raise ValueError(
            f"logp_memory, logp_proposal, correct must all be (B,); got "
            f"{tuple(logp_memory.shape)}, {tuple(logp_proposal.shape)}, {tuple(correct.shape)}"
        )
    beta = trice_control_variate(correct, contributes).to(logp_memory.dtype)
    return trice_terms(logp_memory, logp_proposal, beta, contributes, correct.shape[0])


def trice_terms(
    logp_memory: torch.Tensor,
    logp_proposal: torch.Tensor,
    beta: torch.Tensor,
    contributes: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Part of :func:`trice_surrogate`: the sum over some questions of ``m_i [log p(r_i) -
    beta_i log p(z'_i)] / B``, with ``beta`` (:func:`trice_control_variate`) computed over the
    *whole* batch of ``B`` questions. Summed over micro-batches it is the surrogate of the batch
    (a step accumulates it micro-batch by micro-batch; the control variate stays the batch's,
    so a micro-batch of one question still gets its leave-one-out ``beta``).

    Args:
        logp_memory, logp_proposal, beta, contributes: ``(b,)`` for these questions."""
    m = contributes.bool()
    # torch.where, not a product: a non-contributing -inf / NaN must not leak into the gradient
    memory_term = torch.where(m, logp_memory, 0.0)
    proposal_term = torch.where(m, beta.to(logp_proposal.dtype) * logp_proposal, 0.0)
    return (memory_term - proposal_term).sum() / batch_size


# ---------------------------------------------------------------------------------------------
# DPO, and V-STaR's verifier built on it


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or any(len(s) != 1 for s in shapes.values()):
        raise ValueError(f"expected (B,) tensors of one shape, got {shapes}")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss (Rafailov et al. 2023, Eq. 7), as TRL's ``DPOTrainer``
    (``loss_type="sigmoid"``, no label smoothing):

        ``loss = mean_b -log sigmoid(beta * ((pc - rc) - (pr - rr)))``

    Args:
        policy_chosen, policy_rejected: ``(B,)`` summed log-probabilities of the chosen and the
            rejected completion under the policy being trained (:func:`completion_logprob`).
        ref_chosen, ref_rejected: ``(B,)`` the same under the frozen reference model.
        beta: the KL strength; the rewards are in units of ``beta`` nats.
    Returns:
        ``(loss (), chosen_rewards (B,), rejected_rewards (B,))``, the rewards the implicit
        ``beta * (policy - ref)`` of each completion, detached.
    """
    _check_same_shape(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
    )
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # (B,)
    loss = -F.logsigmoid(beta * margin).mean()
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return loss, chosen_rewards, rejected_rewards


def verifier_score(policy_logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """V-STaR's verifier score (Hosseini et al. 2024): the DPO implicit reward of a candidate
    solution, ``beta * (log p_verifier(y | x) - log p_ref(y | x))``, where the verifier is the
    DPO-trained policy and the reference the model it started from. A higher score means the
    verifier judges the solution more likely correct; within a question only the order
    matters, so any ``beta > 0`` picks the same candidate.

    Args:
        policy_logp, ref_logp: ``(...)`` summed log-probabilities of each candidate's solution.
    Returns:
        ``(...)`` detached scores (for ranking, e.g. by :func:`best_of_k`).
    """
    if policy_logp.shape != ref_logp.shape:
        raise ValueError(
            f"policy_logp and ref_logp must have one shape, got {tuple(policy_logp.shape)} and "
            f"{tuple(ref_logp.shape)}"
        )
    return beta * (policy_logp - ref_logp).detach()


def best_of_k(scores: torch.Tensor, correct: torch.Tensor) -> float:
    """Accuracy of choosing, per question, the candidate with the highest verifier score (the
    first on ties): ``mean_n correct[n, argmax_j scores[n, j]]``.

    Args:
        scores: ``(N, k)`` verifier scores (:func:`verifier_score`); NaN is refused.
        correct: ``(N, k)`` bool, whether each candidate's answer is correct.
    """
    if scores.dim() != 2 or scores.shape != correct.shape or scores.numel() == 0:
        raise ValueError(
            f"scores and correct must both be (N, k) with N, k >= 1; got {tuple(scores.shape)} "
            f"and {tuple(correct.shape)}"
        )
    if scores.isnan().any():
        raise ValueError("scores contain NaN; score every candidate (or -inf to never pick one)")
    pick = scores.argmax(dim=1, keepdim=True)  # (N, 1): the first maximum on ties
    return correct.bool().gather(1, pick).to(torch.float64).mean().item()
