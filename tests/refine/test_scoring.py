"""Scoring sampled paths with the reward checker; pass@k against its definition."""
from itertools import combinations
from types import SimpleNamespace

import pytest

from selfrefine_dist.data.records import ReasoningExample
from selfrefine_dist.refine.scoring import pass_at_k, sample_stats, score_paths


def gen(text):
    return SimpleNamespace(text=text, num_tokens=len(text.split()), finish_reason="stop")


def test_score_paths_uses_the_reward_checker():
    examples = [ReasoningExample("m1", "gsm8k", "2+2?", "4"),
                ReasoningExample("c1", "csqa", "sky?", "B", choices=("green", "blue", "red"))]
    texts = {"m1": [gen("2 + 2 = 4. The answer is 4."), gen("The answer is 5."), gen("")],
             "c1": [gen("The sky is blue. The answer is (B)."), gen("The answer is green.")]}
    paths = score_paths(examples, texts, "cot", model_version=3)
    assert [(p.uid, p.index, p.correct) for p in paths] == [
        ("m1", 0, True), ("m1", 1, False), ("m1", 2, False), ("c1", 0, True), ("c1", 1, False)]
    assert paths[2].reason == "no_answer" and paths[1].extracted == "5"
    assert all(p.model_version == 3 and p.style == "cot" for p in paths)
    stats = sample_stats(paths)
    assert stats.questions == 2 and stats.paths == 5 and stats.correct == 2
    assert stats.k == 2  # the smallest number of samples per question
    assert stats.reasons["no_answer"] == 1


def test_missing_question_raises():
    with pytest.raises(KeyError, match="m2"):
        score_paths([ReasoningExample("m2", "gsm8k", "q", "1")], {}, "cot", 0)


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 2), (4, 4, 2), (8, 1, 8)])
def test_pass_at_k_is_the_chance_that_k_draws_contain_a_correct_one(n, c, k):
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    expected = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected)
