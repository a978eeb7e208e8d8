"""Learn: the Quiet-STaR objective as pure functions over tensors.

Notation: ``B`` sequences, ``k`` thoughts per position, ``L`` positions, ``n`` = ``n_true``
lookahead tokens, ``t`` thought tokens, ``V`` vocabulary.

Objective (the authors' code defaults; Zelikman et al. 2024, Eq. 1-3):
    loss = base_w * NLL_base + mixed_w * mean_j NLL_mixed(j) + policy_w * L_policy
    r[b, s, i]   = sum_j log p_mixed(x_{i+j} | thought s) - mean_s' (same)   (base cancels)
    L_policy     = mean over (b, s, i, thought token) of  -max(r, 0) * log p_T(c)   (per_token)
The baseline (``mean``) and the filter (``max(r, 0)``) are estimator choices with named
alternatives: :func:`baseline_rewards`, :func:`filter_rewards`.

The model's training forward computes what a step needs (:class:`StepOutput`); an *objective*
turns it into a loss (:data:`OBJECTIVES`: ``quiet_star`` with its :class:`ObjectiveConfig`, or
``lm``, the no-thought baseline). Loss weights and the estimator are training settings, never
part of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qstar.config import ObjectiveConfig
from qstar.core.think import shifted_valid


@dataclass
class StepOutput:
    """What one training forward of :class:`qstar.QuietStar` computed; no loss. Tensors that
    carry a graph are marked; the others are detached.

    Attributes:
        base_logprob: ``(B, L-1)`` ``log p(x_{i+1})`` without a thought (graph).
        valid: ``(B, L)`` real tokens.
        lookahead_logprob: ``(B, k, L, n)`` ``log p_mixed(x_{i+1+j})`` after each thought (graph).
        thought_logprob: ``(B, k, L, t)`` log-probabilities of the sampled thought tokens at the
            policy temperature (graph).
        mixing_weight: ``(B, k, L, n)``.
        thoughts: ``(B, k, L, t)`` token ids.
        target_valid: ``(B, 1, L, n)``: ``x_{i+1+j}`` exists.
        positions: ``(B, m)`` when thoughts were computed at chosen positions only
            (``think_at``); the ``L`` axes of the thinking fields are then ``m`` long.
        gate_score: ``(B, L)`` the gate head's predicted gain of thinking (graph to the head).
    The thinking fields are ``None`` for a forward without thoughts.
    """

    base_logprob: torch.Tensor
    valid: torch.Tensor
    lookahead_logprob: torch.Tensor | None = None
    thought_logprob: torch.Tensor | None = None
    mixing_weight: torch.Tensor | None = None
    thoughts: torch.Tensor | None = None
    target_valid: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    gate_score: torch.Tensor | None = None


@dataclass
class Loss:
    """An objective's result: ``loss`` (graph), the parts to log (detached 0-dim tensors),
    the rewards ``(B, k, L)`` and the weighted policy term (graph; what
    :class:`qstar.runs.diagnostics.GradParts` splits off)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    rewards: torch.Tensor | None = None
    policy_term: torch.Tensor | None = None


def quiet_star_loss(
    out: StepOutput, cfg: ObjectiveConfig, reference_logprob: torch.Tensor | None = None
) -> Loss:
    """The Quiet-STaR objective (the module docstring) of one forward.

    ``reference_logprob`` (``(B, L-1)``): what ``baseline="none"`` measures a thought's gain
    against, when not the model's own prediction without a thought (``reward_reference: ema``:
    a moving-average copy's)."""
    nll = -out.lookahead_logprob  # (B, k, L, n)
    valid = out.target_valid  # (B, 1, L, n)
    base = next_token_nll(out.base_logprob, out.valid)
    mixed = mixed_nll(nll, valid)
    reference = out.base_logprob if reference_logprob is None else reference_logprob
    need_base = cfg.baseline == "none" or out.gate_score is not None
    base_ll = base_lookahead(out, reference) if need_base else None  # (B, 1, C)
    rewards = thought_rewards(nll, valid, cfg.baseline, cfg.reward_filter, base_ll)  # (B, k, L)
    policy = policy_loss(
        out.thought_logprob, rewards, valid[..., 0], per_token=cfg.policy_logprob == "per_token"
    )
    loss = weighted_loss(
        base, mixed, policy, cfg.base_loss_weight, cfg.mixed_loss_weight, cfg.policy_weight
    )
    parts = {"base_nll": base.detach(), "mixed_nll": mixed.detach(), "policy_loss": policy.detach()}
    if out.gate_score is not None:
        gate = gate_loss(out, nll, base_ll)
        loss = loss + cfg.gate_loss_weight * gate
        parts["gate_loss"] = gate.detach()
    return Loss(loss, parts, rewards, cfg.policy_weight * policy)


def _columns(x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """``(B, ..., L)`` -> ``(B, ..., m)`` at ``positions`` (``(B, m)``), or ``x``."""
    if positions is None:
        return x
    idx = positions.view(positions.shape[0], *([1] * (x.dim() - 2)), positions.shape[1])
    return x.gather(-1, idx.expand(*x.shape[:-1], positions.shape[1]))


def base_lookahead(out: StepOutput, reference: torch.Tensor) -> torch.Tensor:
    """``(B, 1, C)``: the log-likelihood of each thinking position's lookahead tokens without a
    thought (by ``reference``, ``(B, L-1)``), at the positions that thought."""
    n = out.target_valid.shape[-1]
    full = shifted_valid(out.valid, n)  # (B, L, n)
    return _columns(lookahead_loglik(reference, full), out.positions)


def gate_loss(out: StepOutput, nll: torch.Tensor, base_ll: torch.Tensor) -> torch.Tensor:
    """Squared error of the gate head's predicted gain at the positions that thought against
    the gain measured there: the mean over thoughts of the lookahead tokens' log-likelihood
    with the thought, less without (detached targets; no extra passes)."""
    valid = out.target_valid[..., 0]  # (B, 1, C)
    ll = -(nll.detach() * out.target_valid.to(nll.dtype)).sum(-1).mean(1, keepdim=True)
    gain = (ll - base_ll.detach()).float()  # (B, 1, C)
    pred = _columns(out.gate_score[:, None, :], out.positions).float()  # (B, 1, C)
    return masked_mean((pred - gain) ** 2, valid)


def lm_loss(out: StepOutput, cfg: ObjectiveConfig | None = None) -> Loss:
    """The no-thought baseline: the next-token NLL of the base pass."""
    nll = next_token_nll(out.base_logprob, out.valid)
    return Loss(nll, {"base_nll": nll.detach()})


# name -> (loss function, whether its forward thinks)
OBJECTIVES: dict[str, tuple[Callable[..., Loss], bool]] = {
    "quiet_star": (quiet_star_loss, True),
    "lm": (lm_loss, False),
}


def objective_loss(
    model, input_ids: torch.Tensor, cfg: ObjectiveConfig | None = None, **forward_kwargs
) -> Loss:
    """The Quiet-STaR loss of one training forward of ``model`` (a :class:`qstar.QuietStar`)
    on ``input_ids``: ``quiet_star_loss(model(input_ids, ...), cfg)`` with the thoughts scored
    at ``cfg.policy_temperature`` (the authors' objective by default)."""
    cfg = cfg or ObjectiveConfig()
    out = model(
        input_ids,
        policy_temperature=cfg.policy_temperature,
        trunk_grad=cfg.trunk_grad,
        think_at=cfg.think_at,
        think_fraction=cfg.think_fraction,
        **forward_kwargs,
    )
    return quiet_star_loss(out, cfg)


def step_stats(out: StepOutput, loss: Loss) -> dict[str, float]:
    """Loggable floats of one forward: the loss and its parts, reward and mixing-weight
    statistics."""
    row = {"loss": float(loss.loss.detach()), **{k: float(v) for k, v in loss.parts.items()}}
    if out.mixing_weight is None:
        return row
    valid = out.target_valid.expand_as(out.mixing_weight)
    w = out.mixing_weight[valid].float()
    pos = out.target_valid[..., 0].expand_as(loss.rewards)
    r = loss.rewards[pos].float()
    row.update(
        reward_mean=float(r.mean()) if r.numel() else 0.0,
        reward_max=float(r.max()) if r.numel() else 0.0,
        reward_nonzero=float((r != 0).float().mean()) if r.numel() else 0.0,
        mixing_weight_mean=float(w.mean()) if w.numel() else 0.0,
        mixing_weight_std=float(w.std()) if w.numel() > 1 else 0.0,
    )
    return row


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask`` (same shape); 0 when the mask is empty."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def token_nll(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-log p(target)``: ``(..., V), (...) -> (...)``."""
    return -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def logprob_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` under ``softmax(logits)`` in fp32: ``(..., V), (...) -> (...)``
    (cross-entropy's fused log-softmax, so no ``(..., V)`` log-probabilities are kept)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    flat = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return -flat.view(targets.shape)


def weighted_loss(
    base: torch.Tensor,
    mixed: torch.Tensor,
    policy: torch.Tensor,
    base_weight: float,
    mixed_weight: float,
    policy_weight: float,
) -> torch.Tensor:
    """``base_w * NLL_base + mixed_w * NLL_mixed + policy_w * L_policy`` (the module docstring)."""
    return base_weight * base + mixed_weight * mixed + policy_weight * policy


def base_nll(logits: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of the base pass, averaged over real targets.

    Args:
        logits: ``(B, L, V)``; input_ids, valid: ``(B, L)``.
    """
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = token_nll(lp, input_ids[:, 1:])
    return masked_mean(nll, valid[:, 1:] & valid[:, :-1])


def next_token_nll(logprobs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`base_nll` from ``log p(x_{i+1})`` already computed: ``(B, L-1), (B, L) -> ()``."""
    return masked_mean(-logprobs, valid[:, 1:] & valid[:, :-1])


def mixed_nll(nll: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over lookahead steps ``j`` of the mean over real targets of step ``j``.

    Args:
        nll: ``(B, k, L, n)`` per-target NLL of the mixed prediction.
        valid: ``(B, 1 or k, L, n)`` whether target ``x_{i+1+j}`` exists.
    """
    valid = valid.expand_as(nll).to(nll.dtype)
    per_step = (nll * valid).sum(dim=(0, 1, 2)) / valid.sum(dim=(0, 1, 2)).clamp(min=1)  # (n,)
    has_any = valid.sum(dim=(0, 1, 2)) > 0
    return per_step[has_any].mean() if has_any.any() else nll.sum() * 0


BASELINES = ("mean", "leave_one_out", "none")
REWARD_FILTERS = ("positive", "all", "best")


def thought_rewards(
    nll: torch.Tensor,
    valid: torch.Tensor,
    baseline: str = "mean",
    reward_filter: str = "positive",
    base_ll: torch.Tensor | None = None,
) -> torch.Tensor:
    """REINFORCE reward per thought: the log-likelihood of the true tokens after the thought,
    less a baseline (:func:`baseline_rewards`), then filtered (:func:`filter_rewards`).

    Args:
        nll: ``(B, k, L, n)`` mixed NLL of the true tokens after each thought.
        valid: ``(B, 1 or k, L, n)``.
        baseline, reward_filter: :data:`BASELINES`, :data:`REWARD_FILTERS` (the authors' code:
            ``mean``, ``positive``).
        base_ll: ``(B, 1, L)`` log-likelihood of the same tokens predicted without a thought
            (needed by ``baseline="none"`` only; see :func:`lookahead_loglik`).
    Returns:
        ``(B, k, L)`` detached rewards.
    """
    ll = -(nll.detach() * valid.to(nll.dtype)).sum(dim=-1)  # (B, k, L) log-likelihood
    return filter_rewards(baseline_rewards(ll, baseline, base_ll), reward_filter)


def baseline_rewards(
    ll: torch.Tensor, baseline: str, base_ll: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, k, L)`` log-likelihoods -> rewards, by control variate:

    - ``mean``: ``ll - mean_k ll``, the thought itself included (the authors' code). Its
      expected policy gradient is ``(k - 1) / k`` of the true one (the self term's share);
    - ``leave_one_out``: ``ll - mean of the other k - 1`` ``= k / (k - 1) (ll - mean_k ll)``,
      unbiased (TRICE, RLOO); needs ``k >= 2``;
    - ``none``: ``ll - base_ll``, the gain over the prediction without a thought (Williams'
      REINFORCE with no control variate; ``base_ll`` is a constant of the position, not of the
      thought).
    """
    if baseline == "mean":
        return ll - ll.mean(dim=1, keepdim=True)
    if baseline == "leave_one_out":
        k = ll.shape[1]
        if k < 2:
            raise ValueError("baseline=leave_one_out needs n_thoughts >= 2")
        return (ll - ll.mean(dim=1, keepdim=True)) * (k / (k - 1))
    if baseline == "none":
        if base_ll is None:
            raise ValueError("baseline=none needs the base log-likelihood (base_ll)")
        return ll - base_ll.detach().to(ll.dtype)
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")


def filter_rewards(r: torch.Tensor, reward_filter: str) -> torch.Tensor:
    """``(B, k, L)`` rewards -> the rewards that get credit:

    - ``positive``: ``max(r, 0)`` (the authors' code);
    - ``all``: ``r``, signed (a worse-than-baseline thought is pushed down);
    - ``best``: only the highest-reward thought of each position (the first on ties), and only
      where its reward is positive (STaR-style filtering: learn from the best of k).
    """
    if reward_filter == "positive":
        return r.clamp(min=0)
    if reward_filter == "all":
        return r
    if reward_filter == "best":
        best = torch.zeros_like(r).scatter_(1, r.argmax(dim=1, keepdim=True), 1.0)
        return r.clamp(min=0) * best
    raise ValueError(f"reward_filter must be one of {REWARD_FILTERS}, got {reward_filter!r}")


def lookahead_loglik(next_logprobs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Base log-likelihood of each position's lookahead tokens, what ``baseline="none"``
    subtracts: ``(B, L - 1)`` ``log p(x_{m+1})`` and ``(B, L, n)`` target validity (``valid[b,
    i, j]``: ``x_{i+1+j}`` exists) ``-> (B, 1, L)`` ``sum_j log p(x_{i+1+j})``."""
    B, L, n = valid.shape
    lp = torch.cat([next_logprobs.detach(), next_logprobs.new_zeros(B, n)], dim=1)  # (B, L-1+n)
    idx = torch.arange(L, device=lp.device)[:, None] + torch.arange(n, device=lp.device)
    return (lp[:, idx] * valid.to(lp.dtype)).sum(-1)[:, None]


def policy_loss(
    thought_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    position_valid: torch.Tensor,
    per_token: bool = True,
) -> torch.Tensor:
    """REINFORCE term ``-r log p(thought)``.

    Args:
        thought_logprobs: ``(B, k, L, t)`` log-probabilities of the sampled thought tokens
            (at the policy temperature).
        rewards: ``(B, k, L)``, detached.
        position_valid: ``(B, 1 or k, L)``: positions that have at least one true target.
        per_token: average over thought tokens (the authors' code) instead of summing them
            into the whole thought's log-probability (the paper's text).
    """
    lp = thought_logprobs.mean(dim=-1) if per_token else thought_logprobs.sum(dim=-1)
    return masked_mean(-rewards.detach() * lp, position_valid.expand_as(lp))
