"""Statistics over seeds: mean +- std of a score, and an improvement paired by seed with its confidence interval.

Pairing by seed matters: runs of the same seed share their validation split and their baseline (which is
also their teacher), so the per-seed differences vary less than the two scores do apart.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation of a single value is 0."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def differences(values: Sequence[float], reference: Sequence[float]) -> list[float]:
    """values[i] - reference[i], seed by seed; both must hold one score per seed."""
    if len(values) != len(reference):
        raise ValueError(f"paired scores need one value per seed on both sides, got {len(values)} and {len(reference)}")
    return [v - r for v, r in zip(values, reference)]


def paired(values: Sequence[float], reference: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation of the per-seed differences values - reference."""
    return mean_std(differences(values, reference))


def paired_ci(values: Sequence[float], reference: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean difference, low, high): the Student-t interval of the per-seed differences.

    mean +- t_{(1 + level) / 2, n - 1} * s / sqrt(n), with s the sample standard deviation of the n
    differences; it needs n >= 2.
    """
    from scipy.stats import t

    diffs = differences(values, reference)
    if len(diffs) < 2:
        raise ValueError(f"a confidence interval needs at least 2 paired values, got {len(diffs)}")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be between 0 and 1")
    mean, std = mean_std(diffs)
    half = float(t.ppf((1 + level) / 2, len(diffs) - 1)) * std / math.sqrt(len(diffs))
    return mean, mean - half, mean + half
