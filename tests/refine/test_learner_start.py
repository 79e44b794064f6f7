"""``refine.learner_start``: when a round's learners start against its sampler engines and sampling.

The loop's own ``start_learners`` runs; the sampler pool and the learner group are stand-ins that record
the order of calls (the real ones, in Ray, go through the same path in tests/benchmarks/test_round_bench.py,
whose round 1 starts both, and in tests/refine/test_loop.py)."""
import pytest

from selfrefine_dist.config import load_config
from selfrefine_dist.data.records import ReasoningExample
from selfrefine_dist.refine.driver import SelfRefineLoop
from selfrefine_dist.stages import StageLedger
from selfrefine_dist.tracking import MetricsLogger


class Samplers:
    def __init__(self, events, started):
        self.events, self.started = events, started

    def start(self):
        self.events.append("samplers start")
        self.started = True

    def ready(self):
        self.events.append("samplers ready")


class Learners:
    def __init__(self, events):
        self.events = events

    def ready(self):
        self.events.append("learners ready")


def order(tiny_model_dir, tmp_path, *overrides, samplers_up=False, samples_done=False, dpo_done=False):
    cfg = load_config("configs/demo_cpu.yaml", list(overrides))
    events = []
    questions = [ReasoningExample("q0", "chain_sum", "1 + 2 =", "3")]
    loop = SelfRefineLoop(cfg, tmp_path, str(tiny_model_dir), "sftfp", questions, Samplers(events, samplers_up),
                          MetricsLogger(tmp_path), StageLedger(tmp_path, say=lambda s: None))

    def learner_group(version, wait=True):
        events.append(f"learners load (wait={wait})")
        loop.learners, loop.learners_at = Learners(events), loop.model_fps[version]

    loop.learner_group = learner_group
    samples, dpo = loop.samples_stage(1), object()
    loop.ledger.is_done = lambda stage: (stage is dpo and dpo_done) or (stage is samples and samples_done)
    loop.start_learners(1, samples, dpo)
    return events


def test_cpu_default_loads_learners_with_the_sampler_engines_and_samples_after_both(tiny_model_dir, tmp_path):
    assert order(tiny_model_dir, tmp_path) == ["samplers start", "learners load (wait=False)", "samplers ready",
                                               "learners ready"]


def test_gpu_default_loads_learners_while_the_round_samples(tiny_model_dir, tmp_path):
    assert order(tiny_model_dir, tmp_path, "refine.gpus_per_learner=1") == ["learners load (wait=False)"]


@pytest.mark.parametrize("case", [dict(samplers_up=True), dict(samples_done=True), dict(dpo_done=True)])
def test_with_samplers_leaves_the_learners_for_after_the_pairs(tiny_model_dir, tmp_path, case):
    """Engines up already (nothing to load beside), samples read back (no engines needed), or DPO done."""
    assert order(tiny_model_dir, tmp_path, **case) == []


def test_explicit_choices(tiny_model_dir, tmp_path):
    assert order(tiny_model_dir, tmp_path, "refine.learner_start=after_pairs") == []
    assert order(tiny_model_dir, tmp_path, "refine.learner_start=while_sampling",
                 samplers_up=True) == ["learners load (wait=False)"]
    assert order(tiny_model_dir, tmp_path, "refine.gpus_per_learner=1",
                 "refine.learner_start=with_samplers")[0] == "samplers start"
