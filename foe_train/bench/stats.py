"""Statistics of the benchmarks' repeated measurements: a member's summary, and the FoE/MoE
ratio of each interleaved round, which tells parity from a real gap on a noisy machine."""

from __future__ import annotations

import statistics


def summary(values: list[float]) -> dict[str, float]:
    """Median (the headline: robust to the odd slow step on a shared machine), p10, p90,
    mean."""
    ordered = sorted(values)
    last = len(ordered) - 1
    return {"median": statistics.median(ordered), "p10": ordered[round(0.1 * last)],
            "p90": ordered[round(0.9 * last)], "mean": statistics.fmean(ordered)}


def paired_ratios(num: list[float], den: list[float]) -> dict[str, float]:
    """num/den of each round (the two members measured back to back, so a slow spell of the
    machine hits both): the summary of the ratios and ``wins``, the share of rounds above 1."""
    ratios = [n / d for n, d in zip(num, den, strict=True)]
    return {**summary(ratios), "wins": sum(r > 1 for r in ratios) / len(ratios)}
