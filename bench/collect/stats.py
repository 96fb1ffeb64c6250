"""Statistics over per-step samples: median, a distribution-free 95% interval, spread."""

from __future__ import annotations

import math
import statistics


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def median_ci95(xs: list[float]) -> tuple[float, float] | None:
    """95% confidence interval of the median from order statistics.

    The number of samples below the median is Binomial(n, 1/2); the interval is
    [x_(j), x_(k)] with j, k the binomial 2.5% / 97.5% quantiles (Conover, Practical
    Nonparametric Statistics, 3rd ed., §3.2; normal approximation of the binomial). No
    assumption of normality, robust to the outliers that shared machines produce.
    """
    n = len(xs)
    if n < 2:
        return None
    s = sorted(xs)
    half = 1.959964 * math.sqrt(n) / 2
    lo = max(0, int(math.floor(n / 2 - half)))
    hi = min(n - 1, int(math.ceil(n / 2 + half)) - 1)
    return s[lo], s[hi]


def cv(xs: list[float]) -> float | None:
    """Coefficient of variation: sample standard deviation / mean."""
    if len(xs) < 2:
        return None
    m = statistics.fmean(xs)
    return statistics.stdev(xs) / m if m else None
