"""Uncertainty for small experiments: percentile bootstrap over clusters (pure NumPy).

Held-out NLL is a mean over tokens, but tokens of one window are not independent, so the
bootstrap resamples *windows* (clusters) and recomputes the token-weighted mean: for per-window
sums ``s_w`` and token counts ``n_w`` the statistic is ``sum(s_w) / sum(n_w)``. Paired
comparisons (with minus without thinking, one run against another on the same windows) are the
same statistic over per-token differences. Task scores resample examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
ZERO = 1e-9  # differences this small are float error (e.g. 0.1 + 0.2 - 0.3), not a finding


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile bootstrap interval."""

    value: float
    lo: float
    hi: float
    n: int  # clusters (windows or examples)

    def excludes_zero(self, tol: float = ZERO) -> bool:
        return self.sign(tol) != 0

    def sign(self, tol: float = ZERO) -> int:
        """+1 when the interval lies above zero, -1 below, 0 when it includes zero (within
        ``tol``: an interval of float error around 0 resolves nothing)."""
        if self.lo > tol:
            return 1
        if self.hi < -tol:
            return -1
        return 0

    def digits(self, scale: float = 1.0, least: int = 1, most: int = 6) -> int:
        """Decimals that show the smallest non-zero of value and bounds with two significant
        digits (at least ``least``, at most ``most``), so a small difference never prints as
        0.0."""
        values = [abs(v * scale) for v in (self.value, self.lo, self.hi)]
        values = [v for v in values if v > ZERO * abs(scale) and math.isfinite(v)]
        if not values:
            return least
        return max(least, min(most, 1 - math.floor(math.log10(min(values)))))

    def fmt(self, digits: int = 4, scale: float = 1.0, sign: bool = False) -> str:
        """``"0.0123 [0.0101, 0.0145]"``."""
        f = f"{{:{'+' if sign else ''}.{digits}f}}"
        return (
            f"{f.format(self.value * scale)} "
            f"[{f.format(self.lo * scale)}, {f.format(self.hi * scale)}]"
        )


def ratio_bootstrap(
    sums: np.ndarray, counts: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
) -> Estimate:
    """``sum(sums) / sum(counts)`` with a bootstrap interval over clusters.

    Args:
        sums: ``(W,)`` per-cluster sums of the per-token quantity.
        counts: ``(W,)`` tokens per cluster.
    """
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    if sums.shape != counts.shape or sums.ndim != 1:
        raise ValueError(f"sums {sums.shape} and counts {counts.shape} must be equal 1-d shapes")
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    W = len(sums)
    if W == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    value = float(sums.sum() / counts.sum())
    idx = np.random.default_rng(seed).integers(0, W, size=(n_boot, W))
    boot = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return Estimate(value, float(lo), float(hi), W)


def token_mean(
    per_window: list[np.ndarray], select: list[np.ndarray] | None = None, **kw
) -> Estimate:
    """Token-weighted mean of per-token values, bootstrapped over windows.

    Args:
        per_window: one ``(n_w,)`` array per window.
        select: optional boolean ``(n_w,)`` per window (e.g. the hardest decile).
    """
    if select is None:
        select = [np.ones(len(v), dtype=bool) for v in per_window]
    sums = np.array(
        [float(np.asarray(v)[s].sum()) for v, s in zip(per_window, select, strict=True)]
    )
    counts = np.array([int(np.asarray(s).sum()) for s in select])
    return ratio_bootstrap(sums, counts, **kw)


def mean_bootstrap(values: np.ndarray, **kw) -> Estimate:
    """Mean of independent values (e.g. per-example task scores) with a bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    return ratio_bootstrap(values, np.ones_like(values), **kw)
