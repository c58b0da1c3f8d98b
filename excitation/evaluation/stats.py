"""Paired bootstrap intervals for per-image scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

__all__ = ["Interval", "bootstrap_mean", "paired_difference"]


@dataclass(frozen=True)
class Interval:
    """A mean and its percentile bootstrap interval, over ``n`` finite values."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3g} [{self.low:.3g}, {self.high:.3g}]"


def bootstrap_mean(values: np.ndarray, *, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """The mean of ``values`` (NaNs dropped) with a percentile bootstrap ``level`` interval."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(v.mean()), float(low), float(high), int(v.size))


def paired_difference(a: np.ndarray, b: np.ndarray, **options) -> Interval:
    """Mean of ``a - b`` over images where both are finite, with a paired bootstrap interval.

    Resampling whole images (pairs) keeps the per-image correlation between the
    two explainers, so the interval is far tighter than comparing two unpaired means.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need one value per image each, got {a.shape} and {b.shape}.")
    return bootstrap_mean(a - b, **options)
