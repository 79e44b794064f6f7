"""The experiment levers reach the parts they steer: the reference and start policy reach the learners,
the question order picks each round's questions, the temperature schedule reaches the sampler's settings,
and the best round is chosen on validation (never on the reported evaluation)."""
import json
from types import SimpleNamespace

import pytest

from selfrefine_dist.config import load_config
from selfrefine_dist.data.records import ReasoningExample
from selfrefine_dist.pipeline import choose_final
from selfrefine_dist.refine.driver import SelfRefineLoop
from selfrefine_dist.refine.learner import learner_spec
from selfrefine_dist.sampling.records import SamplingStats
from selfrefine_dist.stage_specs import round_temperature


def test_reference_choice_reaches_the_learners():
    sft = load_config("configs/demo_cpu.yaml", ["dpo.reference=sft"])
    spec = learner_spec(sft, "/runs/x/sft/model", 2, policy_path="/runs/x/rounds/round_01/model")
    assert spec.reference_path == "/runs/x/sft/model" and spec.policy_path == "/runs/x/rounds/round_01/model"
    prev = learner_spec(load_config("configs/demo_cpu.yaml", ["dpo.reference=previous_round"]), "/m", 2)
    assert prev.reference_path is None and prev.policy_path == "/m"  # None: the policy at the start of the round
    assert spec.lean_activations is True
    plain = learner_spec(load_config("configs/demo_cpu.yaml", ["model.lean_activations=false"]), "/m", 2)
    assert plain.lean_activations is False  # the model's own RMSNorm and MLP modules


class RecordingPool:
    """Stands in for the Ray sampler pool (the real one is tested in tests/sampling); records the settings."""

    def __init__(self):
        self.version, self.settings = 0, []
        self.last_stats = None

    def peak_rss_gib(self):
        return 0.5

    def generate(self, requests, settings, progress=False):
        self.settings.append(settings)
        paths = sum(r.n for r in requests)
        self.last_stats = SamplingStats(len(requests), paths, generated_tokens=9 * paths, seconds=1.0, retried_items=0)
        return {r.key: [SimpleNamespace(text="1 + 2 = 3.\nThe answer is 3.", num_tokens=9, finish_reason="stop")]
                * r.n for r in requests}


class Samplers:
    def __init__(self):
        self.pool = RecordingPool()

    def ensure(self, version, folder):
        self.pool.version = version


def loop(tiny_model_dir, tmp_path, *overrides):
    from selfrefine_dist.stages import StageLedger
    from selfrefine_dist.tracking import MetricsLogger

    cfg = load_config("configs/demo_cpu.yaml", ["refine.questions_per_round=2", "sampler.samples_per_question=1",
                                                "refine.probe_questions=0", *overrides])
    questions = [ReasoningExample(f"q{i}", "chain_sum", f"{i} + 2 =", str(i + 2)) for i in range(5)]
    return SelfRefineLoop(cfg, tmp_path, str(tiny_model_dir), "sftfp", questions, Samplers(), MetricsLogger(tmp_path),
                          StageLedger(tmp_path, say=lambda s: None))


@pytest.mark.parametrize("order, expected", [("fresh", [["q0", "q1"], ["q2", "q3"], ["q4", "q0"]]),
                                             ("same", [["q0", "q1"]] * 3)])
def test_question_order(tiny_model_dir, tmp_path, order, expected):
    driver = loop(tiny_model_dir, tmp_path, f"refine.question_order={order}")
    assert [[ex.uid for ex in driver.round_questions(r)] for r in (1, 2, 3)] == expected


def test_temperature_schedule_reaches_the_sampler(tiny_model_dir, tmp_path):
    driver = loop(tiny_model_dir, tmp_path, "sampler.temperature_schedule=[0.5,1.2]", "refine.rounds=3")
    for r in (1, 2, 3):
        driver.model_fps[r - 1] = f"fp{r - 1}"
        _, metrics = driver.samples(r, driver.samples_stage(r))
        assert driver.samplers.pool.settings[-1].temperature == round_temperature(driver.cfg, r) == metrics[
            "sampling_temperature"]
        assert metrics["sampled_tokens"] == 9 * len(driver.round_questions(r)) * driver.cfg.sampler.samples_per_question
    assert [s.temperature for s in driver.samplers.pool.settings] == [0.5, 1.2, 1.2]


def write_validation(run_dir, label, correct):
    (run_dir / "validation").mkdir(parents=True, exist_ok=True)
    rows = [{"uid": f"q{i}", "task": "chain_sum", "correct": c} for i, c in enumerate(correct)]
    return SimpleNamespace(label=label, samples=rows)


def test_best_round_is_chosen_on_validation(tmp_path):
    cfg = load_config("configs/demo_cpu.yaml", ["refine.rounds=3", "refine.select_best_round=true",
                                                "data.validation=[{task: chain_sum, source: offline, split: validation, limit: 4}]"])
    validate = SimpleNamespace(results=[write_validation(tmp_path, "sft", [1, 0, 0, 0]),
                                        write_validation(tmp_path, "round_1", [1, 1, 1, 0]),
                                        write_validation(tmp_path, "round_2", [1, 1, 1, 0]),
                                        write_validation(tmp_path, "round_3", [1, 1, 0, 0])])
    final = choose_final(cfg, tmp_path, validate)
    assert final["label"] == "round_1" and final["round"] == 1  # the tie goes to the earlier round
    assert json.loads((tmp_path / "final.json").read_text()) == final
    last = choose_final(load_config("configs/demo_cpu.yaml", ["refine.rounds=3"]), tmp_path, None)
    assert last == {"label": "round_3", "round": 3, "reason": "last round"}


def test_select_best_round_needs_validation_questions():
    from selfrefine_dist.config import ConfigError

    with pytest.raises(ConfigError, match="data.validation"):
        load_config("configs/demo_cpu.yaml", ["refine.select_best_round=true"])
