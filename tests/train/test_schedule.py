"""The batch plan: a step's examples do not depend on how the step is split."""
import pytest

from selfrefine_dist.train.schedule import BatchPlan, WarmupThenDecay


def test_step_examples_are_the_same_for_any_split():
    a = BatchPlan(num_examples=40, micro_batch_size=1, grad_accum=4, world_size=2, seed=3)
    b = BatchPlan(num_examples=40, micro_batch_size=4, grad_accum=1, world_size=2, seed=3)
    for step in range(a.total_steps(epochs=2, max_steps=None)):
        flat_a = sorted(i for r in range(2) for mb in a.micro_batches(step, r) for i in mb)
        flat_b = sorted(i for r in range(2) for mb in b.micro_batches(step, r) for i in mb)
        assert flat_a == flat_b == sorted(a.step_indices(step))


def test_epoch_covers_each_example_once_and_reshuffles():
    plan = BatchPlan(num_examples=24, micro_batch_size=2, grad_accum=2, world_size=2, seed=0)
    assert plan.steps_per_epoch == 3
    epoch0 = [i for s in range(3) for i in plan.step_indices(s)]
    epoch1 = [i for s in range(3, 6) for i in plan.step_indices(s)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(24))
    assert epoch0 != epoch1
    assert plan.step_indices(4) == plan.step_indices(4)  # a pure function of the step: resume needs no state


def test_too_few_examples_is_a_clear_error():
    with pytest.raises(ValueError, match="do not fill one global batch of 16"):
        BatchPlan(num_examples=10, micro_batch_size=4, grad_accum=2, world_size=2, seed=0).total_steps(1, None)


def test_lr_schedule_shapes():
    cos = WarmupThenDecay(warmup_steps=2, total_steps=10, kind="cosine")
    assert cos(0) == pytest.approx(1 / 3) and cos(1) == pytest.approx(2 / 3)
    assert cos(2) == pytest.approx(1.0) and cos(10) == pytest.approx(0.0, abs=1e-12)
    assert WarmupThenDecay(0, 10, "linear")(5) == pytest.approx(0.5)
    assert WarmupThenDecay(0, 10, "constant")(9) == 1.0
