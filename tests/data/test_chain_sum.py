"""chain_sum: reasoning-gym sums with a programmatic teacher; splits kept apart from each other."""
import pytest

from selfrefine_dist.data.demonstrations import select_demonstrations
from selfrefine_dist.data.sources import load_examples
from selfrefine_dist.data.tasks import chain_sum_rationale
from selfrefine_dist.pipeline import without_training_questions


def test_rationale_is_a_running_total():
    assert chain_sum_rationale("12 + 7 - 3") == "12 + 7 = 19. 19 - 3 = 16."
    assert chain_sum_rationale("5 - 9 + 0 + 41") == "5 - 9 = -4. -4 + 0 = -4. -4 + 41 = 37."
    for bad in ("3", "1 * 2", "1 + 2 +", "__import__('os')"):
        with pytest.raises(ValueError):
            chain_sum_rationale(bad)


def test_every_demonstration_passes_the_answer_check_and_splits_differ():
    train = load_examples("chain_sum", "offline", "train", limit=300)
    test = load_examples("chain_sum", "offline", "test", limit=300)
    kept, report = select_demonstrations(train)
    assert report.kept == 300  # the teacher is always right
    assert all(ex.rationale.split()[-1].rstrip(".") == ex.answer for ex in train)
    assert all(3 <= len(ex.question.removeprefix("Compute").split("=")[0].split()) // 2 + 1 <= 4 for ex in train)
    # different generator seeds; the few questions both splits draw are left out of evaluation
    clean, dropped = without_training_questions(test, train)
    assert dropped < 15 and len(clean) == 300 - dropped
    assert not {e.question for e in clean} & {e.question for e in train}
