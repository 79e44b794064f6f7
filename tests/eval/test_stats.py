"""Accuracy and its bootstrap interval."""
import numpy as np

from selfrefine_dist.eval.stats import bootstrap_accuracy


def test_point_estimate_and_interval():
    outcomes = [True] * 30 + [False] * 70
    acc = bootstrap_accuracy(outcomes, resamples=2000, seed=1)
    assert (acc.correct, acc.total, acc.accuracy) == (30, 100, 0.3)
    assert acc.ci_low < 0.3 < acc.ci_high
    # normal approximation of the binomial: 0.3 +- 1.96 * sqrt(0.3 * 0.7 / 100) = [0.21, 0.39]
    assert abs(acc.ci_low - 0.21) < 0.03 and abs(acc.ci_high - 0.39) < 0.03


def test_interval_narrows_with_more_questions():
    rng = np.random.default_rng(0)
    small = bootstrap_accuracy(rng.random(50) < 0.4)
    large = bootstrap_accuracy(rng.random(2000) < 0.4)
    assert (large.ci_high - large.ci_low) < 0.5 * (small.ci_high - small.ci_low)


def test_empty_is_nan_not_an_error():
    acc = bootstrap_accuracy([])
    assert acc.total == 0 and np.isnan(acc.accuracy)
