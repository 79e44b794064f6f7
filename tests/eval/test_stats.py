"""Accuracy and its bootstrap interval; the paired change and the minimum detectable change."""
import math

import numpy as np
import pytest

from selfrefine_dist.eval.stats import (bootstrap_accuracy, minimum_detectable_change, paired_difference,
                                        planned_minimum_detectable_change)


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


def outcome_rows(correct_by_question, task="gsm8k"):
    return [{"uid": f"q{i:03d}", "task": task, "correct": bool(c)} for i, c in enumerate(correct_by_question)]


def test_paired_difference():
    n = 120
    before = outcome_rows([i < 40 for i in range(n)])
    same = paired_difference(before, before)
    assert (same.mean, same.ci_low, same.ci_high, same.n) == (0.0, 0.0, 0.0, n) and not same.excludes_zero
    gain = paired_difference(before, outcome_rows([i < 90 for i in range(n)]))
    assert gain.mean == pytest.approx(50 / n) and 0 < gain.ci_low < gain.mean < gain.ci_high
    assert gain.excludes_zero
    # pairing: order of rows does not matter, unmatched questions are left out, the seed fixes the interval
    shuffled = [before[i] for i in np.random.default_rng(1).permutation(n)]
    assert paired_difference(shuffled, outcome_rows([i < 90 for i in range(n)])) == gain
    assert paired_difference(before[:10], outcome_rows([i < 90 for i in range(n)])).n == 10
    # (uid, task) is the question: the same uid in another task is not matched
    assert paired_difference(before, outcome_rows([True] * n, task="obqa")).n == 0
    # a small change on few questions: the interval includes 0
    small = paired_difference(before, outcome_rows([i < 42 for i in range(n)]))
    assert small.ci_low <= 0 <= small.ci_high and not small.excludes_zero
    assert paired_difference([], before).n == 0


def test_mde_from_the_differences_is_the_formula():
    rng = np.random.default_rng(4)
    d = rng.choice([-1.0, 0.0, 1.0], p=[0.1, 0.7, 0.2], size=300)
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / len(d))
    assert minimum_detectable_change(d) == pytest.approx((1.96 + 0.84) * sd / math.sqrt(300))
    assert minimum_detectable_change(n=300, sd=sd) == pytest.approx(minimum_detectable_change(d))
    # for d in {-1, 0, 1}: sd(d)^2 = p - mean^2, p the share of questions that changed outcome
    p = np.mean(d != 0)
    assert minimum_detectable_change(d) == pytest.approx(
        planned_minimum_detectable_change(300, discordance=p, change=mean))
    # the planning form: 400 questions, a fifth of them expected to flip: 2.8 * sqrt(0.2) / 20
    assert planned_minimum_detectable_change(400, 0.2) == pytest.approx(2.8 * math.sqrt(0.2) / 20)
    # paired_difference carries the MDE of its per-question differences
    before, after = rng.random(300) < 0.5, rng.random(300) < 0.6
    diffs = after.astype(float) - before.astype(float)
    assert paired_difference(outcome_rows(before), outcome_rows(after), resamples=100).mde == pytest.approx(
        (1.96 + 0.84) * diffs.std() / math.sqrt(300))


def test_mde_edge_cases():
    assert math.isnan(minimum_detectable_change([1.0]))
    assert math.isnan(minimum_detectable_change(n=0, sd=0.5))
    assert minimum_detectable_change([0.0, 0.0, 0.0]) == 0.0  # nothing changed: nothing to scale by
    with pytest.raises(ValueError):
        minimum_detectable_change([1.0, 0.0], n=2, sd=0.5)
    with pytest.raises(ValueError):
        minimum_detectable_change(n=10)
    with pytest.raises(ValueError):
        planned_minimum_detectable_change(100, discordance=0.01, change=0.2)  # change^2 > discordance
    assert math.isnan(paired_difference([], []).mde)


def test_a_true_change_of_one_mde_is_detected_about_80_percent_of_the_time():
    """Simulate paired evaluations whose true change equals the planned MDE; the paired bootstrap interval
    should exclude 0 in about 80% of them (the power the MDE is defined with)."""
    n, p = 400, 0.2
    delta = planned_minimum_detectable_change(n, p)
    rng = np.random.default_rng(11)
    detected = 0
    trials = 300
    for t in range(trials):
        # each question: +1 with probability (p + delta) / 2, -1 with (p - delta) / 2, else unchanged
        u = rng.random(n)
        d = np.where(u < (p + delta) / 2, 1, np.where(u < p, -1, 0))
        before = rng.random(n) < 0.5
        before = np.where(d == 1, False, np.where(d == -1, True, before))
        after = before + d
        diff = paired_difference(outcome_rows(before), outcome_rows(after), resamples=400, seed=t)
        detected += diff.excludes_zero
    # 300 trials: standard error sqrt(0.8 * 0.2 / 300) = 0.023
    assert 0.72 <= detected / trials <= 0.88
