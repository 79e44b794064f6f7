"""Accuracy with a 95% bootstrap interval; the paired change between two evaluations and the smallest
change an evaluation of n questions can resolve (the minimum detectable change, MDE)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

Z_CONFIDENCE = 1.96  # two-sided 95% confidence
Z_POWER = 0.84  # 80% power


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


def minimum_detectable_change(diffs: Optional[Sequence[float]] = None, n: Optional[int] = None,
                              sd: Optional[float] = None) -> float:
    """The smallest mean paired change resolvable at 95% confidence with 80% power (a fraction, >= 0).

        MDE = (1.96 + 0.84) * sd(d) / sqrt(n)

    Either from the per-question differences ``diffs`` (d_i in {-1, 0, 1}; sd with ddof=0, which for such d
    is sqrt(p - mean(d)^2), p the share of questions whose outcome changed), or from ``n`` and an assumed
    ``sd`` (see ``planned_minimum_detectable_change``). NaN when it cannot be estimated: fewer than 2
    differences, or n < 1.
    """
    if diffs is not None:
        if n is not None or sd is not None:
            raise ValueError("minimum_detectable_change: give either diffs, or n and sd, not both")
        d = np.asarray(diffs, dtype=np.float64)
        if len(d) < 2:
            return float("nan")
        n, sd = len(d), float(d.std())
    elif n is None or sd is None:
        raise ValueError("minimum_detectable_change: give diffs, or both n and sd")
    if n < 1:
        return float("nan")
    return (Z_CONFIDENCE + Z_POWER) * sd / math.sqrt(n)


def planned_minimum_detectable_change(n: int, discordance: float, change: float = 0.0) -> float:
    """The MDE of a planned comparison on ``n`` questions when a share ``discordance`` of them is expected
    to change outcome (right -> wrong or wrong -> right) and the true mean change is ``change``:
    sd(d) = sqrt(p - change^2), about sqrt(p) for small changes."""
    if not 0.0 <= discordance <= 1.0 or change * change > discordance:
        raise ValueError(f"discordance must be in [0, 1] and at least change^2; got {discordance}, change {change}")
    return minimum_detectable_change(n=n, sd=math.sqrt(discordance - change * change))


@dataclass(frozen=True)
class Difference:
    """Mean per-question change in accuracy (fractions) with its 95% bootstrap interval, over n questions;
    ``mde``: the smallest change these n questions resolve (95% confidence, 80% power)."""

    mean: float
    ci_low: float
    ci_high: float
    n: int
    mde: float = float("nan")

    @property
    def excludes_zero(self) -> bool:
        return self.n > 0 and (self.ci_low > 0 or self.ci_high < 0)


def paired_difference(before: Sequence[dict], after: Sequence[dict], resamples: int = 2000,
                      seed: int = 0) -> Difference:
    """Accuracy of ``after`` minus ``before`` on the questions both answered, matched by (uid, task).

    d_i = correct_after_i - correct_before_i in {-1, 0, 1}; the estimate is mean(d), the interval the 2.5/97.5
    percentiles of the means of ``resamples`` resamples of the questions. Resampling questions (not each run
    apart) keeps the pairing, so the interval is far narrower than the two accuracies' own intervals suggest.
    """
    first = {(r["uid"], r["task"]): float(bool(r["correct"])) for r in before}
    second = {(r["uid"], r["task"]): float(bool(r["correct"])) for r in after}
    keys = sorted(set(first) & set(second))  # a fixed order, so the seeded resamples do not depend on file order
    d = np.array([second[k] - first[k] for k in keys])
    if len(d) == 0:
        return Difference(float("nan"), float("nan"), float("nan"), 0)
    means = d[np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Difference(float(d.mean()), float(low), float(high), len(d), minimum_detectable_change(d))
