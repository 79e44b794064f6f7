"""Teacher demonstrations are kept only when their final answer matches the gold answer."""
from selfrefine_dist.data.demonstrations import select_demonstrations
from selfrefine_dist.data.records import ReasoningExample
from selfrefine_dist.data.sources import load_examples


def test_gsm8k_rationales_are_kept():
    examples = load_examples("gsm8k", "offline", "test", limit=200)
    kept, report = select_demonstrations(examples)
    assert report.total == 200 and report.kept == len(kept) == 200 and report.dropped == {}


def test_wrong_missing_and_unanswered_demonstrations_are_dropped_with_reasons():
    mk = lambda uid, rationale, answer="12", task="gsm8k", choices=(): ReasoningExample(  # noqa: E731
        uid=uid, task=task, question="q", answer=answer, choices=choices, rationale=rationale)
    examples = [
        mk("ok", "3 boxes of 4 is 3 * 4 = 12.\nThe answer is 12."),
        mk("wrong", "3 boxes of 4 is 3 + 4 = 7.\nThe answer is 7."),
        mk("none", None),
        mk("no_answer", "I am not sure how to do this."),
        mk("mc_ok", "Banks need security. The answer is (A).", "A", "csqa", ("bank", "library")),
        mk("mc_wrong", "Libraries are quiet. The answer is (B).", "A", "csqa", ("bank", "library")),
    ]
    kept, report = select_demonstrations(examples)
    assert [e.uid for e in kept] == ["ok", "mc_ok"]
    assert report.dropped == {"wrong": 2, "no_rationale": 1, "no_answer": 1}
    assert report.dropped_examples["wrong"] == ["wrong", "mc_wrong"]
    assert report.summary() == "demonstrations: kept 2 of 6 (dropped: no_answer 1, no_rationale 1, wrong 2)"


def test_gsm_symbolic_demonstrations_are_checked_against_their_gold():
    examples = load_examples("gsm_symbolic", "offline", "train", limit=60)
    kept, report = select_demonstrations(examples)
    assert report.kept + sum(report.dropped.values()) == 60
    assert report.kept >= 50  # a few generated rationales disagree with their own answer and are dropped


def test_reports_of_slices_combine():
    from selfrefine_dist.data.demonstrations import DemonstrationReport

    a = DemonstrationReport(total=5, kept=3, dropped={"wrong": 2}, dropped_examples={"wrong": ["a1", "a2"]})
    b = DemonstrationReport(total=4, kept=1, dropped={"wrong": 1, "no_rationale": 2},
                            dropped_examples={"wrong": ["b1"], "no_rationale": ["b2", "b3"]})
    both = DemonstrationReport.combine([a, b], show_per_reason=2)
    assert (both.total, both.kept, both.dropped) == (9, 4, {"wrong": 3, "no_rationale": 2})
    assert both.dropped_examples == {"wrong": ["a1", "a2"], "no_rationale": ["b2", "b3"]}
