"""Statistics of the benchmarks' repeated measurements: a member's summary, the FoE/MoE
ratio of each interleaved round, which tells parity from a real gap on a noisy machine, and
the drift of the machine's speed over a run, which tells whether the run met one load."""

from __future__ import annotations

import math
import statistics


def summary(values: list[float]) -> dict[str, float]:
    """Median (the headline: robust to the odd slow step on a shared machine), p10, p90,
    mean."""
    ordered = sorted(values)
    last = len(ordered) - 1
    return {"median": statistics.median(ordered), "p10": ordered[round(0.1 * last)],
            "p90": ordered[round(0.9 * last)], "mean": statistics.fmean(ordered)}


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: the order statistics j and n+1-j
    of the sorted values, with the largest j such that fewer than j of n values fall below the
    true median with probability at most (1 - level)/2 (a binomial tail with p = 1/2). It makes
    no assumption about the noise and draws nothing at random. With fewer than 6 values no
    pair of order statistics reaches 95%: the whole range is returned."""
    ordered = sorted(values)
    n, tail = len(ordered), (1 - level) / 2
    j, below = 0, 1 / 2**n  # below: P(at most j values fall below the median)
    while j < n // 2 and below <= tail:
        j += 1
        below += math.comb(n, j) / 2**n
    j = max(j, 1)
    return ordered[j - 1], ordered[n - j]


def paired_ratios(num: list[float], den: list[float]) -> dict[str, float]:
    """num/den of each round (the two members measured back to back, so a slow spell of the
    machine hits both): the summary of the ratios, ``ci95_low``/``ci95_high`` (the 95%
    interval of their median, ``median_interval``: parity when it holds 1) and ``wins``, the
    share of rounds above 1."""
    ratios = [n / d for n, d in zip(num, den, strict=True)]
    low, high = median_interval(ratios)
    return {**summary(ratios), "ci95_low": low, "ci95_high": high,
            "wins": sum(r > 1 for r in ratios) / len(ratios)}


# Above this change of a member's median speed between the halves of a run, the run met more
# than one load: on a shared 2-core machine a 40% slow-down moved the bench pair's FoE/MoE
# ratio from 0.97 to 0.82 within one process (docs/performance.md).
DRIFT_WARNING = 0.2


def drift(values: list[float]) -> float:
    """Median of the second half of a run's rates over that of its first half, minus 1
    (0: the machine ran at one speed; -0.4: the second half 40% slower)."""
    half = len(values) // 2
    if half == 0:
        return 0.0
    return statistics.median(values[-half:]) / statistics.median(values[:half]) - 1
