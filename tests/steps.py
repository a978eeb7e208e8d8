"""One training forward and its loss, as tests need them: the model computes, an objective
(``qstar.core.learn``) turns it into a loss. :func:`build_config` splits test keyword arguments
into the model's settings and the objective's."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from qstar import ObjectiveConfig, QuietStarConfig
from qstar.core import learn
from qstar.core.learn import Loss, StepOutput

OBJECTIVE_KEYS = {f.name for f in fields(ObjectiveConfig)}


def build_config(**kw) -> tuple[QuietStarConfig, ObjectiveConfig]:
    """``QuietStarConfig`` and ``ObjectiveConfig`` from one set of keyword arguments."""
    objective = {k: v for k, v in kw.items() if k in OBJECTIVE_KEYS}
    model = {k: v for k, v in kw.items() if k not in OBJECTIVE_KEYS}
    return QuietStarConfig(**model), ObjectiveConfig(**objective)


@dataclass
class Step:
    """A forward's output with its loss: the fields tests read."""

    out: StepOutput
    result: Loss

    @property
    def loss(self) -> torch.Tensor:
        return self.result.loss

    @property
    def rewards(self) -> torch.Tensor:
        return self.result.rewards

    def __getattr__(self, name):
        if name in ("out", "result"):
            raise AttributeError(name)
        if name in self.result.parts:
            return self.result.parts[name]
        return getattr(self.out, name)

    def stats(self) -> dict[str, float]:
        return learn.step_stats(self.out, self.result)


def step(qs, ids, objective: ObjectiveConfig | None = None, think: bool = True, **kw) -> Step:
    """The model's training forward on ``ids`` and the objective's loss (the model's test
    objective, ``qs.test_objective``, when set; else the authors')."""
    objective = objective or getattr(qs, "test_objective", None) or ObjectiveConfig()
    out = qs(ids, think=think, policy_temperature=objective.policy_temperature, **kw)
    loss_fn = learn.quiet_star_loss if think else learn.lm_loss
    return Step(out, loss_fn(out, objective))
