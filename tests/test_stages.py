"""The stage ledger: reuse, resume, stale detection with the keys that changed, links from sibling runs."""
import json

from selfrefine_dist.config import load_config
from selfrefine_dist.stage_specs import dpo_stage, eval_stage, pairs_stage, round_temperature, samples_stage, sft_stage
from selfrefine_dist.stages import Stage, StageLedger, changed_keys, fingerprint


def make(run_dir, inputs, name="round_01/pairs", artifacts=("rounds/round_01/pairs.jsonl",)):
    return Stage(name, inputs, artifacts)


def write(run_dir, stage, text="x"):
    for rel in stage.artifacts:
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / rel).write_text(text)


def test_fingerprint_is_order_independent_and_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 1.5})
    assert len(fingerprint({})) == 12


def test_changed_keys_names_nested_paths():
    assert changed_keys({"dpo": {"lr": 5e-6, "beta": 0.1}}, {"dpo": {"lr": 1e-6, "beta": 0.1}}) == ["dpo.lr: 5e-06 -> 1e-06"]
    assert changed_keys({"a": 1}, {"a": 1, "b": 2}) == ["b: <absent> -> 2"]


def test_new_finished_then_reused(tmp_path):
    lines = []
    ledger = StageLedger(tmp_path, say=lines.append)
    stage = make(tmp_path, {"lr": 1})
    assert ledger.prepare(stage) == "run"
    ledger.started(stage)
    write(tmp_path, stage)
    ledger.finished(stage)
    again = StageLedger(tmp_path, say=lines.append)  # a new driver reads the ledger from disk
    assert again.prepare(stage) == "reuse" and again.is_done(stage)
    assert lines[-1] == f"stage round_01/pairs: reused ({stage.fingerprint})"


def test_started_with_same_fingerprint_resumes(tmp_path):
    ledger = StageLedger(tmp_path, say=lambda s: None)
    stage = make(tmp_path, {"lr": 1})
    ledger.started(stage)
    assert StageLedger(tmp_path, say=lambda s: None).prepare(stage) == "resume"


def test_changed_input_moves_stale_artifacts_aside_and_says_why(tmp_path):
    lines = []
    ledger = StageLedger(tmp_path, say=lines.append)
    old = make(tmp_path, {"dpo": {"lr": 5e-6}})
    ledger.started(old)
    write(tmp_path, old, "old pairs")
    ledger.finished(old)
    new = make(tmp_path, {"dpo": {"lr": 1e-6}})
    assert ledger.prepare(new) == "run"
    assert not (tmp_path / "rounds/round_01/pairs.jsonl").exists()
    stale = list((tmp_path / "stale").rglob("pairs.jsonl"))
    assert len(stale) == 1 and stale[0].read_text() == "old pairs"  # nothing deleted
    assert any("stale: dpo.lr: 5e-06 -> 1e-06" in line for line in lines)
    assert "round_01/pairs" not in json.loads((tmp_path / "stages.json").read_text())


def test_artifacts_without_a_record_are_never_reused(tmp_path):
    lines = []
    stage = make(tmp_path, {"lr": 1})
    write(tmp_path, stage)  # written by an older version, or by hand
    assert StageLedger(tmp_path, say=lines.append).prepare(stage) == "run"
    assert any("no fingerprint recorded" in line for line in lines)


def test_missing_artifact_of_a_finished_stage_reruns_it(tmp_path):
    ledger = StageLedger(tmp_path, say=lambda s: None)
    stage = make(tmp_path, {"lr": 1})
    write(tmp_path, stage)
    ledger.finished(stage)
    (tmp_path / stage.artifacts[0]).unlink()
    assert ledger.prepare(stage) == "run"


def test_sibling_run_with_same_fingerprint_is_linked(tmp_path):
    sweep = tmp_path / "sweep"
    first, second = sweep / "a", sweep / "b"
    stage = Stage("sft", {"sft": {"lr": 1e-4}}, ("sft",), extras=("learner/step_1",))
    ledger = StageLedger(first, reuse_from=str(sweep), say=lambda s: None)
    assert ledger.prepare(stage) == "run"
    (first / "sft" / "model").mkdir(parents=True)
    (first / "sft" / "model" / "config.json").write_text("{}")
    ledger.finished(stage)
    lines = []
    other = StageLedger(second, reuse_from=str(sweep), say=lines.append)
    assert other.prepare(stage) == "reuse"
    assert (second / "sft").is_symlink() and (second / "sft" / "model" / "config.json").read_text() == "{}"
    assert "linked from" in lines[-1]
    assert StageLedger(second, say=lambda s: None).prepare(stage) == "reuse"  # recorded as done
    # a different fingerprint is not linked
    changed = Stage("sft", {"sft": {"lr": 2e-4}}, ("sft",))
    assert StageLedger(sweep / "c", reuse_from=str(sweep), say=lambda s: None).prepare(changed) == "run"


def test_stage_specs_route_keys_to_the_stages_they_change():
    cfg = load_config("configs/demo_cpu.yaml")
    def stages(c):
        sft = sft_stage(c, "fp32", "d", None)
        samples = samples_stage(c, 1, sft.fingerprint, "q", "fp32")
        pairs = pairs_stage(c, 1, samples.fingerprint)
        dpo = dpo_stage(c, 1, pairs.fingerprint, sft.fingerprint, sft.fingerprint, "fp32")
        ev = eval_stage(c, "round_1", dpo.fingerprint, "e", "fp32")
        return [s.fingerprint for s in (sft, samples, pairs, dpo, ev)]
    base = stages(cfg)
    def diff(*overrides):
        return [a != b for a, b in zip(base, stages(load_config("configs/demo_cpu.yaml", list(overrides))))]
    assert diff("logging.progress_bars=false", "sft.save_every=5", "sampler.num_actors=3") == [False] * 5
    assert diff("dpo.lr=1.0e-5") == [False, False, False, True, True]
    assert diff("refine.max_pairs_per_question=1") == [False, False, True, True, True]
    assert diff("sampler.temperature=0.5") == [False, True, True, True, True]
    assert diff("sft.lr=3.0e-4") == [True] * 5
    assert diff("eval.max_new_tokens=99") == [False, False, False, False, True]


def test_temperature_schedule_per_round():
    cfg = load_config("configs/demo_cpu.yaml", ["sampler.temperature=0.9", "sampler.temperature_schedule=[0.6,1.0]"])
    assert [round_temperature(cfg, r) for r in (1, 2, 3)] == [0.6, 1.0, 1.0]
    assert round_temperature(load_config("configs/demo_cpu.yaml", ["sampler.temperature=0.9"]), 2) == 0.9
