"""Accuracy with a 95% bootstrap confidence interval."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int
    accuracy: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{100 * self.accuracy:5.1f} [{100 * self.ci_low:5.1f}, {100 * self.ci_high:5.1f}] (n={self.total})"


def bootstrap_accuracy(outcomes: Sequence[bool], resamples: int = 1000, seed: int = 0) -> Accuracy:
    """Point accuracy and the 2.5/97.5 percentiles of accuracies of resampled outcome sets."""
    x = np.asarray(outcomes, dtype=np.float64)
    n = len(x)
    if n == 0:
        return Accuracy(0, 0, float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Accuracy(int(x.sum()), n, float(x.mean()), float(low), float(high))
