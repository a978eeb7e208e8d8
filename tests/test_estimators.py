"""The REINFORCE estimator variants (baseline x reward filter) as pure functions: hand-computed
values, and the bias of each baseline measured by Monte Carlo on a toy categorical policy."""

from __future__ import annotations

import pytest
import torch

from qstar import ObjectiveConfig, QuietStarConfig
from qstar.core import learn

# log-likelihoods of k = 3 thoughts at 2 positions: (B=1, k=3, L=2)
LL = torch.tensor([[[-1.0, -2.0], [-4.0, -2.0], [-1.0, -5.0]]])
BASE = torch.tensor([[[-3.0, -2.5]]])  # (B, 1, L): the same tokens without a thought


def test_baselines_by_hand():
    # position 0: ll = (-1, -4, -1), mean -2; position 1: (-2, -2, -5), mean -3
    mean = learn.baseline_rewards(LL, "mean")
    assert mean[0].tolist() == [[1.0, 1.0], [-2.0, 1.0], [1.0, -2.0]]
    # leave one out: -1 - mean(-4, -1) = 1.5; -4 - mean(-1, -1) = -3; ... = 3/2 x centred
    loo = learn.baseline_rewards(LL, "leave_one_out")
    assert loo[0].tolist() == [[1.5, 1.5], [-3.0, 1.5], [1.5, -3.0]]
    none = learn.baseline_rewards(LL, "none", BASE)
    assert none[0].tolist() == [[2.0, 0.5], [-1.0, 0.5], [2.0, -2.5]]
    with pytest.raises(ValueError, match="base"):
        learn.baseline_rewards(LL, "none")


def test_filters_by_hand():
    r = torch.tensor([[[1.0, -0.5], [-2.0, -0.1], [1.0, -3.0]]])
    assert learn.filter_rewards(r, "positive")[0].tolist() == [[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]]
    assert torch.equal(learn.filter_rewards(r, "all"), r)
    # best: the first of the tied maxima at position 0; none at position 1 (its best is < 0)
    assert learn.filter_rewards(r, "best")[0].tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]


def test_thought_rewards_composes_and_masks():
    nll = torch.tensor([[[[1.0, 0.5]], [[2.0, 9.0]]]])  # (B=1, k=2, L=1, n=2)
    valid = torch.tensor([[[[True, False]]]])  # the second target does not exist
    # ll = (-1, -2) (the 9.0 is masked); mean baseline: (0.5, -0.5)
    assert learn.thought_rewards(nll, valid)[0, :, 0].tolist() == [0.5, 0.0]
    assert learn.thought_rewards(nll, valid, "leave_one_out", "all")[0, :, 0].tolist() == [
        1.0,
        -1.0,
    ]
    base = torch.tensor([[[-1.5]]])
    got = learn.thought_rewards(nll, valid, "none", "all", base)
    assert got[0, :, 0].tolist() == [0.5, -0.5]


def test_lookahead_loglik_sums_the_base_log_probs_of_each_lookahead():
    lp = torch.tensor([[-1.0, -2.0, -3.0]])  # log p(x_1), log p(x_2), log p(x_3); L = 4
    valid = torch.tensor([[[True, True], [True, True], [True, False], [False, False]]])
    # position i sums log p(x_{i+1}) + log p(x_{i+2}) where they exist
    assert learn.lookahead_loglik(lp, valid)[0, 0].tolist() == [-3.0, -5.0, -3.0, 0.0]


@pytest.mark.parametrize(
    "baseline, shrink",
    [("leave_one_out", 1.0), ("mean", 2 / 3), ("none", 1.0)],  # k = 3: (k-1)/k = 2/3
)
def test_baselines_bias_on_a_toy_policy(baseline, shrink):
    """A categorical policy over 4 actions with fixed rewards f(a): the exact gradient of
    E[f] is ``p * (f - E f)``. Averaged over many draws of k = 3 actions, the policy term's
    gradient (through learn.thought_rewards and learn.policy_loss) matches ``shrink`` times it
    within 4 standard errors: leave-one-out and no baseline are unbiased, the mean baseline
    (self included) shrinks it by (k-1)/k."""
    torch.manual_seed(0)
    theta = torch.tensor([0.3, -0.2, 0.8, 0.0], dtype=torch.float64, requires_grad=True)
    f = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=torch.float64)
    p = torch.softmax(theta.detach(), 0)
    exact = p * (f - (p * f).sum())
    draws, k = 40000, 3
    actions = torch.multinomial(p, draws * k, replacement=True).view(draws, k, 1)
    nll = -f[actions][..., None]  # (draws, k, L=1, n=1): reward = log-likelihood = f(a)
    valid = torch.ones(draws, 1, 1, 1, dtype=torch.bool)
    base = torch.zeros(draws, 1, 1, dtype=torch.float64)  # a constant baseline: still unbiased
    r = learn.thought_rewards(nll, valid, baseline, "all", base)
    lp = torch.log_softmax(theta, 0)[actions][..., None]  # (draws, k, L, t=1)
    loss = learn.policy_loss(lp, r, valid[..., 0])  # mean over draws x k of -r log p
    (grad,) = torch.autograd.grad(loss, theta)
    estimate = -grad * k  # E[(1/k) sum_i r_i grad log p(a_i)] -> x k per draw's sum / k
    # the same per draw, explicitly, for the standard error
    onehot = torch.nn.functional.one_hot(actions[..., 0], 4).to(torch.float64)  # (draws, k, 4)
    per_draw = (r[..., 0, None] * (onehot - p)).sum(1)  # (draws, 4): sum_i r_i grad log p(a_i)
    torch.testing.assert_close(per_draw.mean(0), estimate, atol=1e-10, rtol=1e-8)
    se = per_draw.std(0) / draws**0.5
    target = shrink * exact * k  # sum over k draws of an unbiased single-sample estimator
    assert ((per_draw.mean(0) - target).abs() < 4 * se).all(), (per_draw.mean(0), target, se)
    if shrink != 1.0:  # and the unshrunk gradient is excluded: the bias is measurable
        assert ((per_draw.mean(0) - exact * k).abs() > 4 * se).any()


def test_invalid_estimator_settings_fail_at_config_time():
    from qstar.run_config import load_run_config

    with pytest.raises(ValueError, match="n_thoughts >= 2"):
        load_run_config(None, ["quiet_star.n_thoughts=1", "quiet_star.baseline=leave_one_out"])
    with pytest.raises(ValueError, match="reward_filter"):
        ObjectiveConfig(reward_filter="max")
    assert ObjectiveConfig(baseline="none").reward_filter == "positive"


def test_old_positive_rewards_key_still_reads():
    """Checkpoints and run directories written before reward_filter existed still load: a
    saved model drops the training settings, a run config reads the old key."""
    from qstar.config import upgrade_legacy
    from qstar.run_config import load_run_config

    saved = {"thought_len": 3, "positive_rewards": False, "policy_weight": 1e6, "baseline": "mean"}
    assert QuietStarConfig.from_dict(saved) == QuietStarConfig(thought_len=3)
    assert upgrade_legacy({"positive_rewards": False})["reward_filter"] == "all"
    assert upgrade_legacy({"positive_rewards": True})["reward_filter"] == "positive"
    cfg = load_run_config(None, ["quiet_star.positive_rewards=false"])
    assert cfg.quiet_star.reward_filter == "all"
    with pytest.raises(ValueError, match="positive_rewards must be true or false"):
        upgrade_legacy({"positive_rewards": "yes"})


def test_default_estimator_is_the_authors_formula_bit_for_bit():
    """baseline=mean, reward_filter=positive: exactly the formula the method always used."""
    nll = torch.rand(2, 2, 5, 3, generator=torch.Generator().manual_seed(0)) * 4
    valid = torch.rand(2, 1, 5, 3, generator=torch.Generator().manual_seed(1)) > 0.2
    cfg = ObjectiveConfig()
    ll = -(nll * valid).sum(-1)
    want = (ll - ll.mean(dim=1, keepdim=True)).clamp(min=0)
    got = learn.thought_rewards(nll, valid, cfg.baseline, cfg.reward_filter)
    assert torch.equal(got, want)
