"""Pair strategies: ties dropped and counted, duplicates removed, caps, seeded and reproducible."""
from selfrefine_dist.data.records import ReasoningExample
from selfrefine_dist.refine.pairs import build_pairs
from selfrefine_dist.refine.records import ScoredPath


def ex(uid, answer="4"):
    return ReasoningExample(uid=uid, task="gsm8k", question=f"q{uid}", answer=answer, rationale="2+2=4.")


def path(uid, text, correct, style="cot", i=0):
    return ScoredPath(uid, "gsm8k", style, i, text, 5, "stop", correct, None, "correct" if correct else "wrong", 0)


EXAMPLES = [ex("a"), ex("b"), ex("c"), ex("d")]
PROMPTS = {e.uid: f"<prompt {e.uid}>" for e in EXAMPLES}
PATHS = [
    # a: 2 correct (one duplicated), 2 incorrect -> 2 x 2 = 4 candidates
    path("a", "c1", True), path("a", "c1", True), path("a", "c2", True), path("a", "w1", False), path("a", "w2", False),
    path("b", "c1", True), path("b", "c2", True),  # all correct
    path("c", "w1", False), path("c", "", False),  # all incorrect (one empty text)
    # d: nothing sampled
]


def test_correct_vs_incorrect_counts_and_drops():
    pairs, report = build_pairs(EXAMPLES, PROMPTS, PATHS, "correct_vs_incorrect", max_pairs_per_question=3, seed=0)
    assert [p.uid for p in pairs] == ["a", "a", "a"]
    assert all(p.chosen in ("c1", "c2") and p.rejected in ("w1", "w2") for p in pairs)
    assert len({(p.chosen, p.rejected) for p in pairs}) == 3  # no duplicate pairs
    # the first two use four different texts (spread before repeating)
    assert {pairs[0].chosen, pairs[1].chosen} == {"c1", "c2"} and {pairs[0].rejected, pairs[1].rejected} == {"w1", "w2"}
    assert all(p.prompt == "<prompt a>" for p in pairs)
    assert report.dropped == {"all_correct": 1, "all_incorrect": 1, "no_samples": 1}
    assert report.capped == 1 and report.pairs == 3
    assert report.duplicates == 2  # the repeated "c1" and the empty text


def test_pairs_are_reproducible_and_seed_dependent():
    many = [path("a", f"c{i}", True) for i in range(6)] + [path("a", f"w{i}", False) for i in range(6)]
    first, _ = build_pairs(EXAMPLES[:1], PROMPTS, many, "correct_vs_incorrect", 4, seed=1)
    again, _ = build_pairs(EXAMPLES[:1], PROMPTS, many, "correct_vs_incorrect", 4, seed=1)
    other, _ = build_pairs(EXAMPLES[:1], PROMPTS, many, "correct_vs_incorrect", 4, seed=2)
    assert first == again
    assert first != other


def test_cot_vs_direct():
    direct = [path("a", "The answer is 5.", False, style="direct"), path("b", "The answer is 4.", True, style="direct")]
    pairs, report = build_pairs(EXAMPLES, PROMPTS, PATHS, "cot_vs_direct", 4, seed=0, direct_paths=direct)
    assert {(p.uid, p.chosen, p.rejected) for p in pairs} == {
        ("a", "c1", "The answer is 5."), ("a", "c2", "The answer is 5."),
        ("b", "c1", "The answer is 4."), ("b", "c2", "The answer is 4."),
    }
    assert all(p.rejected_source == "direct" for p in pairs)
    assert report.dropped == {"no_correct_cot": 2}


def test_teacher_vs_incorrect():
    demos = {"a": "2 + 2 = 4. The answer is 4.", "c": "Two and two. The answer is 4."}
    pairs, report = build_pairs(EXAMPLES, PROMPTS, PATHS, "teacher_vs_incorrect", 4, seed=0, demonstrations=demos)
    assert {(p.uid, p.rejected) for p in pairs} == {("a", "w1"), ("a", "w2"), ("c", "w1")}
    assert all(p.chosen == demos[p.uid] and p.chosen_source == "teacher" for p in pairs)
    assert report.dropped == {"no_demonstration": 2}
