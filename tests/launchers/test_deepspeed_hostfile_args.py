"""The deepspeed command launchers/deepspeed_hostfile.sh builds for each way of running it (DRY_RUN=1
prints it); test_torchrun_multinode.py runs the local and the --no_ssh ways for real."""
import os
import shlex
import subprocess

import pytest

from launcher_helpers import LAUNCHERS


def dry_run(launcher, hostfile, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [str(LAUNCHERS / launcher), str(hostfile), "configs/x.yaml", "run.dir=/shared/run", "sft.lr=1e-5"]
    out = subprocess.run(cmd, env=dict(base, DRY_RUN="1", **env), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout)


@pytest.fixture
def hostfiles(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.write_text("# a comment\n\nlocalhost slots=2\n")
    two.write_text("node0 slots=8\nnode1 slots=8\n")
    return one, two


def test_one_host_runs_locally_without_ssh(hostfiles):
    cmd = dry_run("sft_deepspeed_hostfile.sh", hostfiles[0])
    assert cmd == ["deepspeed", "--hostfile", str(hostfiles[0]), "--master_port", "29500", "--no_ssh_check",
                   "--master_addr", "127.0.0.1", "--module", "selfrefine_dist.cli", "sft", "--config", "configs/x.yaml",
                   "run.dir=/shared/run", "sft.lr=1e-5"]


def test_several_hosts_over_ssh(hostfiles):
    cmd = dry_run("dpo_deepspeed_hostfile.sh", hostfiles[1], MASTER_PORT="29600")
    assert cmd[:5] == ["deepspeed", "--hostfile", str(hostfiles[1]), "--master_port", "29600"]
    assert "--no_ssh" not in cmd and "--no_ssh_check" not in cmd and "--master_addr" not in cmd  # deepspeed asks node0
    assert cmd[5:9] == ["--module", "selfrefine_dist.cli", "dpo", "--config"]
    cmd = dry_run("dpo_deepspeed_hostfile.sh", hostfiles[1], MASTER_ADDR="10.0.0.5")
    assert cmd[5:7] == ["--master_addr", "10.0.0.5"] and "--no_ssh" not in cmd


def test_every_host_launches_its_own_share_with_node_rank(hostfiles):
    cmd = dry_run("sft_deepspeed_hostfile.sh", hostfiles[1], NODE_RANK="1", MASTER_ADDR="node0")
    assert cmd[5:10] == ["--no_ssh", "--node_rank", "1", "--master_addr", "node0"]
    out = subprocess.run([str(LAUNCHERS / "sft_deepspeed_hostfile.sh"), str(hostfiles[1]), "configs/x.yaml"],
                         env=dict(os.environ, DRY_RUN="1", NODE_RANK="1", MASTER_ADDR=""), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "MASTER_ADDR" in out.stderr


def test_missing_hostfile(tmp_path):
    out = subprocess.run([str(LAUNCHERS / "sft_deepspeed_hostfile.sh"), str(tmp_path / "nope"), "configs/x.yaml"],
                         env=dict(os.environ, DRY_RUN="1"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no hostfile" in out.stderr
