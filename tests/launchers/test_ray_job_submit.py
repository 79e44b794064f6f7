"""launchers/ray_job_submit.sh against a real Ray cluster started here: a head with its dashboard (the job
server), then a small `selfrefine run` (SFT on two torchrun ranks, evaluation on a sampler actor) submitted
as a Ray job whose driver joins the cluster (ray.address=auto). The head starts once per module and only
for the slow test.

The head is this test's own: its own ports and --temp-dir, and it is ended by ending its processes (not
`ray stop`, which would stop every Ray on the machine). RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps the
head on 127.0.0.1: on Linux Ray otherwise replaces a loopback --node-ip-address by the machine's address.
"""
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from launcher_helpers import (LAUNCHERS, VENV_BIN, end_process_group, end_processes, free_port, launcher_env,
                              write_config)

@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster with its dashboard on 127.0.0.1; yields the dashboard's address."""
    # Directly under /tmp: Ray's Unix sockets live in it, and a socket path has at most 107 bytes (pytest's
    # own temp dirs, deeper under pytest-xdist's worker folders, are too long for the dashboard's modules).
    temp_dir = Path(tempfile.mkdtemp(prefix="ray_", dir="/tmp"))
    dashboard = free_port()
    env = launcher_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--min-worker-port", "0", "--max-worker-port", "0", "--num-cpus", "4", "--temp-dir", str(temp_dir),
           "--disable-usage-stats"]
    t0 = time.perf_counter()
    # Its own session: every daemon the head starts stays in this process group, ended below.
    start = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    pgid = start.pid
    try:
        out, _ = start.communicate(timeout=300)
        assert start.returncode == 0, f"{' '.join(cmd)}\n{out[-5000:]}"
        print(f"ray start --head with dashboard: {time.perf_counter() - t0:.1f} s")
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        if start.poll() is None:
            start.kill()
        t0 = time.perf_counter()
        for _ in range(3):  # a daemon may start another process while its group is being ended
            end_process_group(pgid, grace_s=5.0)
            # Processes named by the head's temp dir outside the group (one started while it was being ended).
            left = [pid for pid, cmdline in processes() if str(temp_dir) in cmdline]
            if left:
                print("ending late processes of the head:", [c[:200] for p, c in processes() if p in left])
            end_processes(left, grace_s=5.0)
            left = [pid for pid, cmdline in processes() if str(temp_dir) in cmdline]
            if not left:
                break
        print(f"head ended: {time.perf_counter() - t0:.1f} s")
        assert not left, f"processes of the test's Ray head still running: {left}"
        shutil.rmtree(temp_dir, ignore_errors=True)


def processes():
    """(pid, command line) of every live process."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
                yield int(entry), Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                pass


def job_info(address, job_id) -> dict:
    """The job server's record of a job (GET /api/jobs/<id>): status, entrypoint, driver node..."""
    with urllib.request.urlopen(f"{address}/api/jobs/{job_id}", timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_selfrefine_run_as_a_ray_job(ray_head, tiny_model_dir, tmp_path):
    address, head_env = ray_head
    config, run_dir = write_config(tmp_path / "tiny.yaml", tiny_model_dir), tmp_path / "run"
    job_id = f"selfrefine-test-{int(time.time())}"
    cmd = [str(LAUNCHERS / "ray_job_submit.sh"), str(config), f"run.dir={run_dir}", "refine.rounds=0",
           "distributed.nproc_per_node=2", "sampler.backend=hf", "sampler.num_actors=1"]
    t0 = time.perf_counter()
    submit = subprocess.Popen(cmd, env=dict(head_env, RAY_ADDRESS=address, SUBMISSION_ID=job_id),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = submit.communicate(timeout=900)  # waits for the job, tailing its logs
    except subprocess.TimeoutExpired:
        subprocess.run([str(VENV_BIN / "ray"), "job", "stop", "--address", address, job_id], env=head_env, timeout=120)
        end_process_group(submit.pid)
        raise
    print(f"ray job submit -> SUCCEEDED: {time.perf_counter() - t0:.0f} s")
    assert submit.returncode == 0, out[-8000:]
    info = job_info(address, job_id)
    assert info["status"] == "SUCCEEDED" and info["driver_exit_code"] == 0, info
    assert info["entrypoint"].startswith("python -m selfrefine_dist.cli run --config tiny.yaml ray.address=auto"), info
    # The driver joined this cluster (not a Ray of its own); SFT ran on two ranks.
    assert "Connecting to existing Ray cluster" in out and "world 2" in out, out[-8000:]

    saved = (run_dir / "config.yaml").read_text()
    assert f"dir: {run_dir}" in saved and "address: auto" in saved
    assert (run_dir / "sft" / "model" / "model.safetensors").is_file()
    result = json.loads((run_dir / "eval" / "sft.json").read_text())
    assert result["label"] == "sft" and result["per_task"]["gsm8k"]["total"] == 4
    stages = json.loads((run_dir / "stages.json").read_text())
    assert {k: stages[k]["status"] for k in ("sft", "eval/sft")} == {"sft": "done", "eval/sft": "done"}, stages


def test_relative_run_dir_is_refused(tmp_path):
    """The job runs in a temporary folder on the cluster: a relative run.dir would be lost, so the
    launcher refuses it before contacting the cluster (here none listens at RAY_ADDRESS)."""
    config = write_config(tmp_path / "tiny.yaml", tmp_path / "model")
    env = launcher_env(RAY_ADDRESS=f"http://127.0.0.1:{free_port()}")
    for overrides in (["run.dir=runs/x"], []):
        out = subprocess.run([str(LAUNCHERS / "ray_job_submit.sh"), str(config), *overrides], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "absolute" in out.stderr, out.stderr
