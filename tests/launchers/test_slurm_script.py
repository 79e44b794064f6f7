"""launchers/slurm_ray_cluster.sbatch outside Slurm: the variables sbatch sets, and fake `scontrol`, `srun`
and `sleep` on PATH that log what they were asked to run (srun answers `hostname --ip-address` with a
made-up address and runs nothing else). Checked: it parses, and it would start the Ray head on the first
node, then a worker on every other node, then the driver on the head, joined to the head's address."""
import os
import shlex
import subprocess
import textwrap
import time

import pytest

from launcher_helpers import LAUNCHERS

SCRIPT = LAUNCHERS / "slurm_ray_cluster.sbatch"
NODES = ["gpu-a17", "gpu-a18", "gpu-b02"]
HEAD_IP = "10.20.0.17"
OVERRIDE = "data.train=[{task: gsm8k, source: hf, split: train}]"  # spaces and brackets must survive


@pytest.fixture
def fake_slurm(tmp_path):
    """A PATH with fake scontrol/srun/sleep, and the environment sbatch gives a 3-node job."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    # One write per call (O_APPEND keeps it whole): background sruns log at the same time as the script.
    log = (f'line=$(printf "%q " "$(basename "$0")" "$@"); printf "%s\\n" "$line" >> {shlex.quote(str(calls))}')
    fakes = {
        "scontrol": f"""{log}
            [[ $1 == show && $2 == hostnames ]] || {{ echo "fake scontrol: $*" >&2; exit 1; }}
            printf '%s\\n' {' '.join(NODES)}""",
        "srun": f"""{log}
            if [[ ${{@: -2}} == "hostname --ip-address" ]]; then echo "{HEAD_IP} fe80::1"; fi""",
        "sleep": log,
    }
    for name, body in fakes.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body).strip() + "\n")
        path.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_JOB_NAME="selfrefine", SLURM_JOB_NODELIST="gpu-a[17-18],gpu-b02", SLURM_NNODES="3",
               SLURM_JOB_NUM_NODES="3", SLURM_NTASKS_PER_NODE="1", SLURM_CPUS_PER_TASK="64",
               SLURM_GPUS_PER_NODE="h100:8", SLURM_SUBMIT_DIR=str(tmp_path), SLURM_CLUSTER_NAME="fake")
    env.pop("DRY_RUN", None)
    env.pop("RAY_PORT", None)
    return env, calls


def expected_commands(config):
    head, workers = NODES[0], NODES[1:]
    resources = ["--num-cpus=64", "--num-gpus=8"]
    return [
        ["srun", "--nodes=1", "--ntasks=1", "-w", head, "ray", "start", "--head", f"--node-ip-address={HEAD_IP}",
         "--port=6379", *resources, "--block"],
        ["sleep", "15"],
        *[["srun", "--nodes=1", "--ntasks=1", "-w", w, "ray", "start", f"--address={HEAD_IP}:6379", *resources,
           "--block"] for w in workers],
        ["sleep", "15"],
        ["srun", "--nodes=1", "--ntasks=1", "-w", head, "--overlap", "python", "-m", "selfrefine_dist.cli", "run",
         "--config", config, f"ray.address={HEAD_IP}:6379", OVERRIDE],
    ]


def logged(calls, expect_lines=0, timeout_s=10.0):
    """The logged calls; waits (up to timeout_s) for expect_lines of them, since background sruns the script
    does not wait for may log after it exits."""
    deadline = time.monotonic() + timeout_s
    while len(lines := calls.read_text().splitlines()) < expect_lines and time.monotonic() < deadline:
        time.sleep(0.05)
    return [shlex.split(line) for line in lines]


def test_script_parses():
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_dry_run_prints_head_then_workers_then_driver(fake_slurm):
    env, calls = fake_slurm
    out = subprocess.run(["bash", str(SCRIPT), "configs/gpu_llama3_8b_teacher70b.yaml", OVERRIDE],
                         env=dict(env, DRY_RUN="1"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert all(line.startswith("+ ") for line in lines), out.stdout
    printed = [shlex.split(line[2:].removesuffix(" &")) for line in lines]
    assert printed == expected_commands("configs/gpu_llama3_8b_teacher70b.yaml"), out.stdout
    # Ray daemons go to the background; the driver runs in the foreground (the job ends with it).
    assert [line.endswith(" &") for line in lines] == [True, False, True, True, False, False]
    # Only the allocation was read: the node list, and the head's address through srun.
    assert logged(calls) == [["scontrol", "show", "hostnames", "gpu-a[17-18],gpu-b02"],
                             ["srun", "--nodes=1", "--ntasks=1", "-w", NODES[0], "hostname", "--ip-address"]]


def test_real_mode_runs_the_same_commands(fake_slurm):
    """Without DRY_RUN the script runs what DRY_RUN prints (here into the fake srun and sleep)."""
    env, calls = fake_slurm
    out = subprocess.run(["bash", str(SCRIPT), "configs/x.yaml", OVERRIDE], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    expected = expected_commands("configs/x.yaml")
    ran = logged(calls, expect_lines=2 + len(expected))[2:]  # after the scontrol and hostname queries
    # Background sruns may log in any order (their order is checked in DRY_RUN above).
    assert sorted(map(tuple, ran)) == sorted(map(tuple, expected)), ran


def test_missing_config_is_a_usage_error(fake_slurm):
    env, calls = fake_slurm
    out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "usage" in out.stderr
    assert not calls.exists()  # nothing ran
