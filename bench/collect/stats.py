"""Statistics over per-step samples: median, a distribution-free 95% interval, spread."""

from __future__ import annotations

import math
import statistics


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def binomial_coverage(n: int, j: int, k: int) -> float:
    """Coverage of [x_(j), x_(k)] (1-indexed order statistics of n independent continuous
    samples) as an interval for the median: P(j ≤ B ≤ k−1), B ~ Binomial(n, ½) (Conover,
    Practical Nonparametric Statistics, 3rd ed., §3.2), summed exactly."""
    return sum(math.comb(n, b) for b in range(j, k)) / 2**n


def median_interval(xs: list[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """The narrowest symmetric order-statistic interval [x_(j), x_(n+1−j)] whose exact coverage
    is at least `level`, as (low, high, coverage); None where none exists (for 95%: n < 6,
    where even [min, max] covers only 1 − 2^(1−n): 50% at n = 2, 93.75% at n = 5)."""
    n = len(xs)
    if n < 2:
        return None
    best = None
    for j in range(1, n // 2 + 1):
        cov = binomial_coverage(n, j, n + 1 - j)
        if cov < level:
            break
        best = (j, cov)
    if best is None:
        return None
    s = sorted(xs)
    j, cov = best
    return s[j - 1], s[n - j], cov


def median_ci95(xs: list[float]) -> tuple[float, float] | None:
    """95% confidence interval of the median from order statistics, exact (median_interval):
    coverage at least 95% at every n, None below n = 6 (no such interval exists). No
    assumption of normality, robust to the outliers that shared machines produce; it does
    assume independent samples, which successive steps are not quite (docs/measurement.md)."""
    out = median_interval(xs, 0.95)
    return (out[0], out[1]) if out else None


def range_coverage(n: int) -> float:
    """What [min, max] of n samples covers of the median: 1 − 2^(1−n)."""
    return 1 - 2.0 ** (1 - n)


def cv(xs: list[float]) -> float | None:
    """Coefficient of variation: sample standard deviation / mean."""
    if len(xs) < 2:
        return None
    m = statistics.fmean(xs)
    return statistics.stdev(xs) / m if m else None


def throughput_ci95(tokens_per_s: float, steps: list[float], rounds: int = 1) -> list[float] | None:
    """95% interval of a window's throughput (tokens over the window's wall time) by batch
    means (Law & Kelton, Simulation Modeling and Analysis, §9.5.3): the steps in ⌊√n⌋ runs of
    consecutive steps (at least 3), a Student-t interval on the mean of the run means (runs of
    neighbouring steps absorb the correlation between them that an i.i.d. interval ignores),
    and each end rescales the headline: tokens_per_s · mean step / end; the short end of the
    step interval is floored at the fastest step seen (a noisy window's t interval can reach
    zero). None below 6 steps, as for the median (median_ci95). With 3 or more `rounds` (the
    steps hold that many independent windows in order, sweep.py) each round is one batch:
    independent replicates rather than neighbouring runs of one window."""
    reps = replicates(steps, rounds) if len(steps) >= 6 else None
    if reps is None or not tokens_per_s:
        return None
    from scipy.stats import t

    means, b = reps[0], len(reps[0])
    m, half = statistics.fmean(means), t.ppf(0.975, b - 1) * statistics.stdev(means) / math.sqrt(b)
    fastest = max(m - half, min(steps))  # a mean step below the fastest step seen is not credible
    return [float(tokens_per_s * m / (m + half)), float(tokens_per_s * m / fastest)]


def replicates(samples: list[float], rounds: int = 1) -> tuple[list[float], str] | None:
    """Nearly independent replicates of a per-step time, and what they are: with 3 or more
    `rounds` (independent windows, in order: sweep.py) each round's mean step; else the means
    of ⌊√n⌋ (at least 3) runs of consecutive steps, batch means as in throughput_ci95, which
    absorb the correlation between neighbouring steps but not what one window shares (a
    run-to-run level shift). None below 6 steps."""
    n = len(samples)
    if rounds >= 3 and n % rounds == 0:
        size = n // rounds
        return [statistics.fmean(samples[i * size:(i + 1) * size]) for i in range(rounds)], f"{rounds} rounds"
    if n < 6:
        return None
    b = max(3, math.isqrt(n))
    size = n // b
    return [statistics.fmean(samples[i * size:(i + 1) * size]) for i in range(b)], f"{b} batch means"


def welch_log(a: list[float], b: list[float], shift: float = 0.0, greater: bool = False) -> tuple[float, float]:
    """(mean log b − mean log a, p of Welch's t test that it equals `shift`: two-sided, or
    against "greater" only) for positive replicates: a ratio of times tested on the log scale
    (Welch, Biometrika 34, 1947; the Welch-Satterthwaite degrees of freedom). Equal
    replicates on both sides: p = 1 at the shift (and below it, one-sided), 0 elsewhere."""
    from scipy.stats import t

    la, lb = [math.log(x) for x in a], [math.log(x) for x in b]
    diff = statistics.fmean(lb) - statistics.fmean(la)
    va, vb = statistics.variance(la) / len(la), statistics.variance(lb) / len(lb)
    if va + vb == 0:
        at = math.isclose(diff, shift, abs_tol=1e-12)
        return diff, 1.0 if at or (greater and diff < shift) else 0.0
    df = (va + vb) ** 2 / (va ** 2 / (len(la) - 1) + vb ** 2 / (len(lb) - 1))
    stat = (diff - shift) / math.sqrt(va + vb)
    return diff, float(t.sf(stat, df) if greater else 2 * t.sf(abs(stat), df))


def mean_ci95(xs: list[float]) -> tuple[float, float] | None:
    """95% Student-t interval of the mean of independent replicates (Student, Biometrika 6,
    1908): mean ± t(0.975, n−1)·s/√n. None below 2 replicates. Used on paired differences
    across seeds (the learning-rate schedule report: report/schedule.py)."""
    if len(xs) < 2:
        return None
    from scipy.stats import t

    m, half = statistics.fmean(xs), t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return float(m - half), float(m + half)
