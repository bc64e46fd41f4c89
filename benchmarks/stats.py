"""Summaries of interleaved timing rounds: quantiles, per-round ratios, an interval for the median.

Each round times every implementation once, one after the other, so a ratio taken within a
round compares two implementations under the same load; the median of the per-round ratios is
the figure we report, with its interquartile range and a distribution-free interval for the
median from order statistics (no assumption about the noise of a shared machine).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["median_interval", "quantile", "ratio_summary", "summary"]


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile by linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("quantile of no values")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free interval for the median: ``(low, high, coverage)``.

    With ``n`` values, the interval between the ``k``-th smallest and the ``k``-th largest holds
    the median with probability ``1 - 2 P(Bin(n, 1/2) < k)``, whatever the distribution; ``k``
    is the largest for which that is at least ``level``. With 7 values the only such interval is
    the range, which covers the median with probability 98.4 %.
    """
    n = len(values)
    if n == 0:
        raise ValueError("an interval for the median of no values")
    xs = sorted(values)
    if n == 1:  # a smoke run: the value itself, with no coverage to claim
        return xs[0], xs[0], 0.0

    def coverage(k: int) -> float:
        below = sum(math.comb(n, j) for j in range(k)) / 2**n
        return 1.0 - 2.0 * below

    k = 1
    while k + 1 <= n // 2 and coverage(k + 1) >= level:
        k += 1
    return xs[k - 1], xs[n - k], coverage(k)


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles and IQR of per-round values, with the values themselves."""
    q25, q75 = quantile(values, 0.25), quantile(values, 0.75)
    return {
        "median": quantile(values, 0.5),
        "q25": q25,
        "q75": q75,
        "iqr": q75 - q25,
        "n": len(values),
        "values": list(values),
    }


def ratio_summary(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, Any]:
    """Per-round ratios ``numerator[r] / denominator[r]``: :func:`summary` plus the interval."""
    if len(numerator) != len(denominator):
        raise ValueError("ratios need the same rounds on both sides")
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    out = summary(ratios)
    low, high, cover = median_interval(ratios)
    out.update(ci_low=low, ci_high=high, ci_coverage=cover)
    return out
