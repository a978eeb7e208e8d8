"""Paired estimates on held-out tokens: NLL, the gain of thinking, drift and the comparison with
the no-thought baseline, each a 95% bootstrap over windows of the seed-averaged values with
each seed's own value beside it (see :mod:`qstar.analysis.evidence` for the signs)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qstar.analysis import stats
from qstar.analysis.evidence_arms import Arm, Tokens, seed_of
from qstar.analysis.stats import Estimate

HARD_FRACTION = 0.1  # "hardest decile": tokens with the top 10% step-0 base NLL


@dataclass
class Row:
    """One estimate (bootstrap over windows of the seed-averaged values) and each seed's value."""

    est: Estimate
    seeds: list[float]
    signed: bool = True  # a difference (printed with its sign) rather than a level

    def fmt(self, digits: int = 4) -> str:
        text = self.est.fmt(digits, sign=self.signed)
        if len(self.seeds) > 1:
            f = f"{{:{'+' if self.signed else ''}.{digits}f}}"
            text += " (seeds " + ", ".join(f.format(v) for v in self.seeds) + ")"
        return text


Windows = list[tuple[np.ndarray, np.ndarray]]  # per window: (per-token values, selected)


def _combine(per_seed: list[Windows]) -> Row:
    """Per-window sums and counts, averaged over seeds when the windows match (else pooled)."""
    sums = [np.array([float(v[m].sum()) for v, m in ws]) for ws in per_seed]
    counts = [np.array([float(m.sum()) for _, m in ws]) for ws in per_seed]
    seeds = [float(s.sum() / max(c.sum(), 1)) for s, c in zip(sums, counts, strict=True)]
    if all(len(ws) == len(per_seed[0]) for ws in per_seed) and all(
        [len(v) for v, _ in ws] == [len(v) for v, _ in per_seed[0]] for ws in per_seed
    ):
        est = stats.ratio_bootstrap(np.mean(sums, axis=0), np.mean(counts, axis=0))
    else:
        est = stats.ratio_bootstrap(np.concatenate(sums), np.concatenate(counts))
    return Row(est, seeds)


def _estimate(arm: Arm, step: int, fn) -> Row | None:
    """``fn(trial_id, Tokens) -> Windows | None`` for every seed at ``step``, combined."""
    per_seed = []
    for trial_id, steps in arm.tokens.items():
        if step not in steps:
            continue
        windows = fn(trial_id, steps[step])
        if windows is None:
            return None
        per_seed.append(windows)
    return _combine(per_seed) if per_seed else None


def _all(values: list[np.ndarray]) -> Windows:
    return [(v, np.ones(len(v), dtype=bool)) for v in values]


def _hard_mask(arm: Arm, trial_id: str) -> list[np.ndarray] | None:
    """Hardest decile by this trial's step-0 base NLL (the starting model's difficulty)."""
    first = arm.tokens[trial_id].get(0)
    if first is None:
        return None
    cut = np.quantile(np.concatenate(first.base), 1 - HARD_FRACTION)
    return [w >= cut for w in first.base]


def nll(arm: Arm, step: int, which: str = "base") -> Row | None:
    """Held-out NLL without (``base``) or with (``thought``) thinking."""

    def fn(_, tok: Tokens):
        values = tok.base if which == "base" else tok.thought
        return None if values is None else _all(values)

    row = _estimate(arm, step, fn)
    if row is not None:
        row.signed = False
    return row


def gain(arm: Arm, step: int, hard: bool = False) -> Row | None:
    """NLL without - with thinking (positive: thinking helps), optionally on the hardest decile."""

    def fn(trial_id, tok: Tokens):
        if tok.thought is None:
            return None
        diffs = [b - t for b, t in zip(tok.base, tok.thought, strict=True)]
        if not hard:
            return _all(diffs)
        mask = _hard_mask(arm, trial_id)
        return None if mask is None else list(zip(diffs, mask, strict=True))

    return _estimate(arm, step, fn)


def drift(arm: Arm, step: int) -> Row | None:
    """NLL without thinking at ``step`` - at step 0 (positive: the LM got worse)."""

    def fn(trial_id, tok: Tokens):
        first = arm.tokens[trial_id].get(0)
        if first is None:
            return None
        return _all([b - b0 for b, b0 in zip(tok.base, first.base, strict=True)])

    return _estimate(arm, step, fn)


def vs_baseline(
    arm: Arm, baseline: Arm, step: int, baseline_step: int | None = None, which: str = "base"
) -> Row | None:
    """Baseline NLL (at ``baseline_step``, default ``step``) - this arm's NLL with thinking at
    ``step``; each seed paired with the baseline's run of the same seed where the trial ids
    name seeds (seeds the baseline lacks are left out), else in order. ``which``: the
    reference's NLL without (``base``) or with (``thought``: another thinking arm) thinking."""
    at = step if baseline_step is None else baseline_step
    ids, mine = sorted(baseline.tokens), sorted(arm.tokens)
    by_seed = {seed_of(b): b for b in ids}
    if None in by_seed or any(seed_of(t) is None for t in mine):
        matched = list(zip(mine, ids, strict=False))
    else:
        matched = [(t, by_seed[seed_of(t)]) for t in mine if seed_of(t) in by_seed]
    pairs = [(t, baseline.tokens[b].get(at)) for t, b in matched]
    per_seed = []
    for tid, ref in pairs:
        tok = arm.tokens[tid].get(step)
        ref_nll = None if ref is None else getattr(ref, which)
        if tok is None or ref_nll is None or tok.thought is None:
            continue
        if [len(w) for w in tok.thought] != [len(w) for w in ref_nll]:
            return None  # not the same held-out windows
        per_seed.append(_all([r - t for r, t in zip(ref_nll, tok.thought, strict=True)]))
    return _combine(per_seed) if per_seed else None
