"""Scoring sampled paths with the reward checker (outcome or step-checked); round statistics;
pass@k against its definition."""
import dataclasses
import json
from itertools import combinations
from types import SimpleNamespace

import pytest

from selfrefine_dist.data.records import ReasoningExample
from selfrefine_dist.refine.records import ScoredPath
from selfrefine_dist.refine.scoring import SampleStats, pass_at_k, sample_stats, score_paths


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


# -- reward modes and the round's metrics ------------------------------------------------------------

# chain_sum "12 + 7 - 3" (gold 16) and a GSM8K question (no step checker), sampled K=4 and K=2.
CHAIN = ReasoningExample("c1", "chain_sum", "12 + 7 - 3", "16")
GSM = ReasoningExample("m1", "gsm8k", "2+2?", "4")
CHAIN_TEXTS = [
    "12 + 7 = 19. 19 - 3 = 16.\nThe answer is 16.",  # right answer, right steps          43 chars
    "12 + 7 = 18. 18 - 2 = 16.\nThe answer is 16.",  # right answer, wrong step: lucky     43 chars
    "12 + 7 = 19. 19 - 3 = 15.\nThe answer is 15.",  # wrong answer, wrong step            43 chars
    "I am not sure.",                                  # no answer, no steps                 14 chars
]
GSM_TEXTS = ["2 + 2 = 4. The answer is 4.",  # correct                                          27 chars
             "The answer is five."]          # parse_failure: an answer that is no number       19 chars


def round_paths(reward):
    return score_paths([CHAIN, GSM], {"c1": [gen(t) for t in CHAIN_TEXTS], "m1": [gen(t) for t in GSM_TEXTS]},
                       "cot", model_version=1, reward=reward)


def test_outcome_reward_keeps_the_verdict_and_records_the_steps():
    paths = round_paths("outcome")
    assert [(p.correct, p.reason, p.steps_ok) for p in paths] == [
        (True, "correct", True), (True, "correct", False), (False, "wrong", False), (False, "no_answer", False),
        (True, "correct", None), (False, "parse_failure", None)]


def test_step_checked_reward_fails_lucky_paths():
    paths = round_paths("step_checked")
    assert [(p.correct, p.reason, p.steps_ok) for p in paths] == [
        (True, "correct", True), (False, "wrong_step", False), (False, "wrong", False), (False, "no_answer", False),
        (True, "correct", None), (False, "parse_failure", None)]
    assert paths[1].extracted == "16"  # the stated answer is still reported


def test_direct_answers_have_no_steps_to_check():
    paths = score_paths([CHAIN], {"c1": [gen("The answer is 16."), gen("The answer is 15.")]}, "direct",
                        model_version=0, reward="step_checked")
    assert [(p.correct, p.reason, p.steps_ok) for p in paths] == [(True, "correct", None), (False, "wrong", None)]


def test_unknown_reward_is_named():
    with pytest.raises(ValueError, match="'process'"):
        score_paths([GSM], {"m1": [gen("The answer is 4.")]}, "cot", 0, reward="process")


def test_round_metrics_under_the_outcome_reward():
    metrics = sample_stats(round_paths("outcome")).as_metrics()
    # 6 paths: right answers c1#0, c1#1, m1#0; c1#1 is lucky; c1#3 no_answer and m1#1 parse_failure unread.
    # pass@2 (k = min(4, 2)): c1 n=4 c=2: 1 - C(2,2)/C(4,2) = 5/6; m1 n=2 c=1: 1.0; mean 11/12.
    # tokens (words) 14, 14, 14, 4 | 9, 4 -> 59/6; characters 43, 43, 43, 14 | 27, 19 -> 189/6.
    assert metrics == pytest.approx({
        "sample_accuracy": 3 / 6, "pass_at_2": 11 / 12, "questions": 2, "paths": 6,
        "mean_path_tokens": 59 / 6, "mean_path_chars": 189 / 6, "no_answer_rate": 2 / 6,
        "lucky_paths": 1, "lucky_share": 1 / 3,
        "paths_correct": 3, "paths_wrong": 1, "paths_no_answer": 1, "paths_parse_failure": 1})


def test_round_metrics_under_the_step_checked_reward():
    metrics = sample_stats(round_paths("step_checked")).as_metrics()
    # c1#1 now scores wrong_step: 2 of 6 correct; pass@2 for c1 n=4 c=1: 1 - C(3,2)/C(4,2) = 1/2, m1 1.0 -> 3/4.
    # Lucky paths are counted from the stated answer, so they do not depend on the reward.
    assert metrics == pytest.approx({
        "sample_accuracy": 2 / 6, "pass_at_2": 3 / 4, "questions": 2, "paths": 6,
        "mean_path_tokens": 59 / 6, "mean_path_chars": 189 / 6, "no_answer_rate": 2 / 6,
        "lucky_paths": 1, "lucky_share": 1 / 3,
        "paths_correct": 2, "paths_wrong_step": 1, "paths_wrong": 1, "paths_no_answer": 1,
        "paths_parse_failure": 1})


def test_timeouts_count_as_unread_and_no_right_answer_means_no_lucky_share():
    def path(i, reason, steps_ok):
        return ScoredPath("c1", "chain_sum", "cot", i, "x" * (i + 1), 1, "stop", False, None, reason, 0, steps_ok)

    paths = [path(0, "timeout", False), path(1, "wrong", False), path(2, "wrong", True), path(3, "no_answer", None)]
    metrics = sample_stats(paths).as_metrics()
    assert metrics["no_answer_rate"] == 2 / 4
    assert metrics["lucky_paths"] == 0 and metrics["lucky_share"] == 0.0
    assert metrics["mean_path_chars"] == (1 + 2 + 3 + 4) / 4


def test_no_paths_no_division():
    metrics = SampleStats().as_metrics()
    assert metrics["no_answer_rate"] == 0.0 and metrics["lucky_share"] == 0.0 and metrics["lucky_paths"] == 0
    assert sample_stats([]).as_metrics() == metrics


def test_steps_ok_round_trips_and_old_rows_still_load():
    path = round_paths("step_checked")[1]
    row = json.loads(json.dumps(path.as_dict()))
    assert row["steps_ok"] is False and ScoredPath(**row) == path
    assert [f.name for f in dataclasses.fields(ScoredPath)][-1] == "steps_ok"
    del row["steps_ok"]  # a samples.jsonl row written before the field existed
    assert ScoredPath(**row) == dataclasses.replace(path, steps_ok=None)
