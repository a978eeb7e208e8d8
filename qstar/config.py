"""The Quiet-STaR hyper-parameters, validated eagerly: :class:`QuietStarConfig` (what the model
is and how it computes; saved with it) and :class:`ObjectiveConfig` (how it is trained; a
training setting).

Defaults reproduce the authors' training code (Zelikman et al. 2024, `quiet-star-train.py`),
which is what produced the published numbers; the paper's text variants are named options.

Token counts. The authors' code counts ``n_ahead = thought_len + 3`` (the base pass, ``<start>``,
``<end>`` and the sampled tokens); its "12 ahead" setting samples 9 thought tokens, so
``QuietStarConfig.from_authors(n_ahead=12, n_ahead_talk=4, n_passes=2)`` equals the defaults here.
Model passes per training step: ``1 base + 1 <start> + thought_len + 1 <end> + (n_true - 1)``
``= thought_len + 2 + n_true`` (the code's ``n_ahead + n_ahead_talk - 1``).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, fields
from typing import Any

from qstar.overrides import coerce, did_you_mean, parse_override

MIXING_CHOICES = ("hidden", "logprob")
POLICY_LOGPROB_CHOICES = ("per_token", "per_thought")
ATTENTION_CHOICES = ("sparse", "flex", "einsum", "dense")
BASELINE_CHOICES = ("mean", "leave_one_out", "none")  # as qstar.core.learn.BASELINES
REWARD_FILTER_CHOICES = ("positive", "all", "best")


FUSED_CE_CHOICES = ("chunked", "off")
THINKER_CHOICES = ("shared", "lora")
TRUNK_GRAD_CHOICES = ("all", "lm_only")
REWARD_REFERENCE_CHOICES = ("current", "ema")
THINK_AT_CHOICES = ("all", "hardest", "random", "gate")

# Settings of the training objective that configs written before they moved out of the model's
# config still carry; QuietStarConfig.from_dict drops them (saved models, old run directories).
OBJECTIVE_KEYS = (
    "base_loss_weight",
    "mixed_loss_weight",
    "policy_weight",
    "policy_temperature",
    "policy_logprob",
    "baseline",
    "reward_filter",
    "positive_rewards",
    "trunk_grad",
    "reward_reference",
    "ema_decay",
    "think_at",
    "think_fraction",
    "gate_loss_weight",
)


@dataclass(frozen=True)
class QuietStarConfig:
    """What a Quiet-STaR model is and how it computes (frozen: change one with :meth:`replace`,
    or for a block of code with :meth:`qstar.QuietStar.using`). Saved with the model
    (``qstar_config.json``); how it is *trained* (loss weights, the REINFORCE estimator) is
    :class:`ObjectiveConfig`, a training setting.

    Attributes:
        thought_len: sampled thought tokens per position, without ``<start>``/``<end>`` (``t``).
        n_true: true future tokens predicted after each thought (lookahead, the code's
            ``n_ahead_talk``).
        n_thoughts: thoughts sampled per position in training (``k``, the code's ``n_passes``);
            the REINFORCE baseline is the mean over them, so ``k = 1`` gives zero rewards.
        mixing: ``"hidden"`` mixes hidden states before the LM head with an unbounded weight
            (the authors' code); ``"logprob"`` interpolates log-probabilities with a weight in
            [0, 1] (sigmoid), as the paper's text describes.
        thought_temperature: sampling temperature of thought tokens (1.0: the code's hard
            Gumbel trick, which is exactly categorical sampling at T=1).
        meta_scale: the meta-token embeddings are stored divided by this factor and multiplied
            back on use; under Adam this multiplies their effective learning rate by it (100).
        attention: ``"sparse"`` computes thought attention as a causal prefix part plus a
            per-position diagonal part without a dense mask (FlexAttention with a block mask on
            CUDA; elsewhere the fused kernel: PyTorch's flash kernel for the prefix part, or the
            einsum kernel under sliding windows, softcapping or dropout; ``"flex"`` /
            ``"einsum"`` force one); ``"dense"``
            is the plain reference that materialises the authors' additive mask and runs the
            model's eager attention.
        fused_ce: ``"chunked"`` computes every ``log p(token)`` through the fused, chunked LM
            head (:mod:`qstar.core.head`; exact, no vocabulary-wide logits kept for backward);
            ``"off"`` materialises the logits (the reference path). A run sets it from
            ``train.fused_ce``.
        thinker: ``"shared"`` thinks with the model's own weights (the paper); ``"lora"`` adds
            LoRA weights (:mod:`qstar.core.thinker`) that only the thought rows use (thought
            tokens, ``<end>`` and the lookahead tokens that read a thought), so the model thinks
            with trunk + adapter and speaks without a thought through the trunk alone.
        thinker_rank / thinker_alpha / thinker_targets: the adapter's rank, scale ``alpha /
            rank`` and the names of the linear layers it adapts (comma-separated).
        gate: add a gate head (:class:`qstar.core.positions.GateHead`) that predicts the gain
            of thinking at a position from its state without a thought: trained on the gains
            each step measures, it chooses where to think (``think_at: gate``, and at inference
            ``think_threshold``).
        start_token / end_token: the two meta tokens added to the tokenizer.
        meta_init_text: text whose first token's embedding initialises both meta tokens.
    """

    thought_len: int = 9
    n_true: int = 4
    n_thoughts: int = 2
    mixing: str = "hidden"
    thought_temperature: float = 1.0
    meta_scale: float = 100.0
    attention: str = "sparse"
    fused_ce: str = "chunked"
    thinker: str = "shared"
    thinker_rank: int = 16
    thinker_alpha: float = 32.0
    thinker_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    gate: bool = False
    start_token: str = "<|startofthought|>"
    end_token: str = "<|endofthought|>"
    meta_init_text: str = "---"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the allowed values."""
        _int_in("thought_len", self.thought_len, 1, 256)
        _int_in("n_true", self.n_true, 1, 256)
        _int_in("n_thoughts", self.n_thoughts, 1, 64)
        _choice("mixing", self.mixing, MIXING_CHOICES)
        _choice("attention", self.attention, ATTENTION_CHOICES)
        _choice("fused_ce", self.fused_ce, FUSED_CE_CHOICES)
        _choice("thinker", self.thinker, THINKER_CHOICES)
        _int_in("thinker_rank", self.thinker_rank, 1, 4096)
        _float_gt("thinker_alpha", self.thinker_alpha, 0.0)
        if not isinstance(self.thinker_targets, str) or not self.thinker_targets.strip(","):
            raise ValueError(
                "thinker_targets must name linear layers, comma-separated (e.g. q_proj,v_proj), "
                f"got {self.thinker_targets!r}"
            )
        for name in ("thought_temperature", "meta_scale"):
            _float_gt(name, getattr(self, name), 0.0)
        for name in ("start_token", "end_token", "meta_init_text"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if self.start_token == self.end_token:
            raise ValueError("start_token and end_token must differ")

    # ------------------------------------------------------------------ derived counts
    @property
    def thought_block(self) -> int:
        """Tokens fed per position after the base pass: <start>, c_1..c_t, <end>, n_true-1 true."""
        return self.thought_len + 1 + self.n_true

    @property
    def passes(self) -> int:
        """Model passes per training step: ``thought_len + 2 + n_true``."""
        return self.thought_len + 2 + self.n_true

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_authors(cls, n_ahead: int, n_ahead_talk: int, n_passes: int = 2, **kw: Any):
        """Build from the authors' counts: ``thought_len = n_ahead - 3``."""
        if n_ahead < 4:
            raise ValueError(f"n_ahead must be >= 4 (thought_len = n_ahead - 3), got {n_ahead}")
        return cls(thought_len=n_ahead - 3, n_true=n_ahead_talk, n_thoughts=n_passes, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(QuietStarConfig)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuietStarConfig:
        """From a saved ``qstar_config.json`` (or any mapping of its keys). Objective settings
        that older versions saved with the model (:data:`OBJECTIVE_KEYS`) are dropped."""
        data = {k: v for k, v in data.items() if k not in OBJECTIVE_KEYS}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown QuietStarConfig key(s) {unknown}; valid keys: {sorted(known)}"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> QuietStarConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ObjectiveConfig:
    """How a Quiet-STaR model is trained: the loss of :func:`qstar.core.learn.quiet_star_loss`.
    A training setting, never saved with the model. Defaults reproduce the authors' code.

    Attributes:
        base_loss_weight / mixed_loss_weight: weights of the base-LM NLL and of the mean over the
            ``n_true`` mixed NLLs (the code's ``original_loss_weight = 0.5``).
        policy_weight: weight of the REINFORCE term (the code's ``policy_loss_beta = 1e6``).
        policy_temperature: temperature of the thought log-probabilities in the policy term
            (the code's ``reinforce_temperature = 3``).
        policy_logprob: ``"per_token"`` averages the policy term over thought tokens (code);
            ``"per_thought"`` uses the whole thought's log-probability (paper).
        baseline: the REINFORCE control variate (:func:`qstar.core.learn.baseline_rewards`):
            ``"mean"`` over the ``k`` thoughts, the thought itself included (the code; its
            expected gradient is ``(k-1)/k`` of the true one), ``"leave_one_out"`` (the mean of
            the other ``k-1``; unbiased; needs ``k >= 2``) or ``"none"`` (the gain over the
            prediction without a thought).
        reward_filter: which rewards get credit (:func:`qstar.core.learn.filter_rewards`):
            ``"positive"`` (clamp at 0, the code), ``"all"`` (signed) or ``"best"`` (the best
            of the ``k`` thoughts per position, when positive). Configs that still say
            ``positive_rewards: true/false`` read as ``positive`` / ``all``.
        trunk_grad: ``"all"`` (the paper): every loss term's gradient reaches every weight;
            ``"lm_only"``: the thinking terms (the mixed NLL, the policy term) reach only what
            thinking adds (meta tokens, mixing head, a ``thinker: lora`` adapter), so the
            weights that make the prediction without a thought learn from the base NLL alone,
            as the no-thought baseline does.
        reward_reference: what ``baseline: none`` measures a thought's gain against:
            ``"current"``, the model's own prediction without a thought, or ``"ema"``, an
            exponential moving average of the model (decay ``ema_decay``) predicting without
            a thought (RLP, arXiv 2510.01265).
        think_at / think_fraction: think at every position (``all``, the paper) or at that
            share of each window's positions (:func:`qstar.core.positions.choose`):
            ``hardest`` (highest loss without a thought), ``random`` (its control) or ``gate``
            (highest predicted gain; needs ``gate``); only the chosen positions are sampled,
            recomputed and scored.
        gate_loss_weight: weight of the gate head's squared error on the measured gains.
    """

    base_loss_weight: float = 0.5
    mixed_loss_weight: float = 0.5
    policy_weight: float = 1e6
    policy_temperature: float = 3.0
    policy_logprob: str = "per_token"
    baseline: str = "mean"
    reward_filter: str = "positive"
    trunk_grad: str = "all"
    reward_reference: str = "current"
    ema_decay: float = 0.999
    think_at: str = "all"
    think_fraction: float = 1.0
    gate_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the allowed values."""
        _choice("trunk_grad", self.trunk_grad, TRUNK_GRAD_CHOICES)
        _choice("think_at", self.think_at, THINK_AT_CHOICES)
        if isinstance(self.think_fraction, bool) or not 0.0 < self.think_fraction <= 1.0:
            raise ValueError(
                f"think_fraction must be in (0, 1] (the share of positions that think), got "
                f"{self.think_fraction!r}"
            )
        _float_ge("gate_loss_weight", self.gate_loss_weight, 0.0)
        _choice("reward_reference", self.reward_reference, REWARD_REFERENCE_CHOICES)
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay!r}")
        if self.reward_reference == "ema" and self.baseline != "none":
            raise ValueError(
                "reward_reference=ema is the reference of baseline=none (a thought's gain over a "
                f"moving-average model without thoughts); with baseline={self.baseline} it "
                "cancels out of every reward: set baseline=none"
            )
        for name in ("base_loss_weight", "mixed_loss_weight", "policy_weight"):
            _float_ge(name, getattr(self, name), 0.0)
        _float_gt("policy_temperature", self.policy_temperature, 0.0)
        _choice("policy_logprob", self.policy_logprob, POLICY_LOGPROB_CHOICES)
        _choice("baseline", self.baseline, BASELINE_CHOICES)
        _choice("reward_filter", self.reward_filter, REWARD_FILTER_CHOICES)

    def check_thoughts(self, n_thoughts: int) -> None:
        """The estimator against the number of thoughts per position."""
        if self.baseline == "leave_one_out" and n_thoughts < 2:
            raise ValueError(
                "baseline=leave_one_out averages the other n_thoughts - 1 thoughts: it needs "
                f"n_thoughts >= 2, got n_thoughts={n_thoughts} (or use baseline=none)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(ObjectiveConfig)}

    def replace(self, **changes: Any) -> ObjectiveConfig:
        return dataclasses.replace(self, **changes)


def upgrade_legacy(section: dict[str, Any]) -> dict[str, Any]:
    """A ``quiet_star`` mapping written before ``reward_filter`` existed (saved checkpoints,
    run directories' ``config.yaml``): ``positive_rewards: true/false`` -> ``reward_filter:
    positive/all``."""
    if not isinstance(section, dict) or "positive_rewards" not in section:
        return section
    section = dict(section)
    value = section.pop("positive_rewards")
    if not isinstance(value, bool):
        raise ValueError(
            f"positive_rewards must be true or false, got {value!r} "
            "(it is now reward_filter: positive|all|best)"
        )
    section.setdefault("reward_filter", "positive" if value else "all")
    return section


def _int_in(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def _float_ge(name: str, value: Any, lo: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= lo:
        raise ValueError(f"{name} must be a number >= {lo}, got {value!r}")


def _float_gt(name: str, value: Any, lo: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > lo:
        raise ValueError(f"{name} must be a number > {lo}, got {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def quiet_star_overrides(texts: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["quiet_star.thought_len=5", ...]`` -> ``{"thought_len": 5}``: the override grammar of
    ``qstar train``, for commands that take only the method's knobs (``qstar eval``, ``qstar
    bench``). Unknown sections or keys fail naming the key; values are validated."""
    hints = typing.get_type_hints(QuietStarConfig)
    out: dict[str, Any] = {}
    for text in texts:
        path, value = parse_override(text)
        dotted = ".".join(path)
        if len(path) != 2 or path[0] != "quiet_star":
            raise ValueError(
                f"override {text!r}: only quiet_star.KEY=VALUE can be set here "
                f"(e.g. quiet_star.thought_len=5)"
            )
        if path[1] in OBJECTIVE_KEYS:
            raise ValueError(
                f"override {text!r}: {path[1]} is a training setting (the loss), not part of the "
                "model; it changes nothing here"
            )
        if path[1] not in hints:
            raise ValueError(
                f"unknown config key {dotted!r}{did_you_mean(path[1], hints)}; "
                f"valid keys: {', '.join(sorted(hints))}"
            )
        out[path[1]] = coerce(dotted, value, hints[path[1]])
    QuietStarConfig().replace(**out)  # validates the values
    return out
