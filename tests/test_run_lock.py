"""One writer per run directory (run_lock.py): real processes hold, die and race for the lock."""
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from selfrefine_dist.run_lock import (LOCK_NAME, TOKEN_ENV, RunDirLocked, RunLock, hold_run_dir, process_start,
                                      read_holder)

HOLD = textwrap.dedent("""
    import sys, time
    from selfrefine_dist.run_lock import hold_run_dir
    with hold_run_dir(sys.argv[1], "run"):
        print("held", flush=True)
        time.sleep(600)
""")


@pytest.fixture(autouse=True)
def no_inherited_token(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def start_holder(run_dir: Path, env=None) -> subprocess.Popen:
    """A process that takes the lock of ``run_dir`` and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env=env or {k: v for k, v in os.environ.items() if k != TOKEN_ENV})
    assert proc.stdout.readline().strip() == "held"
    return proc


def cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selfrefine_dist.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env or {k: v for k, v in os.environ.items() if k != TOKEN_ENV})


def test_the_lock_names_its_holder_and_is_released_on_exit_and_on_exceptions(tmp_path):
    with hold_run_dir(tmp_path, "run") as lock:
        holder = read_holder(tmp_path / LOCK_NAME)
        assert (holder.host, holder.pid, holder.command) == (socket.gethostname(), os.getpid(), "run")
        assert holder.pid_start == process_start(os.getpid()) is not None
        assert os.environ[TOKEN_ENV] == holder.token == lock.holder.token  # what child processes inherit
    assert not (tmp_path / LOCK_NAME).exists() and TOKEN_ENV not in os.environ
    with pytest.raises(ZeroDivisionError):
        with hold_run_dir(tmp_path, "run"):
            1 / 0
    assert not (tmp_path / LOCK_NAME).exists() and TOKEN_ENV not in os.environ


def test_a_second_driver_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    try:
        with pytest.raises(RunDirLocked, match=rf"pid {holder.pid} on host {socket.gethostname()}"):
            RunLock(run_dir, "run").acquire()
        # The command line: exit 2, the holder named, nothing written into the directory.
        out = cli("run", "--config", "configs/demo_cpu.yaml", f"run.dir={run_dir}")
        assert out.returncode == 2, out.stderr
        assert f"run directory locked: {run_dir.resolve()} is in use by 'selfrefine run' (pid {holder.pid} on host " \
               f"{socket.gethostname()}" in out.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]
        assert read_holder(run_dir / LOCK_NAME).pid == holder.pid  # the holder's lock is untouched
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_drivers_lock_is_reported_and_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    holder.send_signal(signal.SIGKILL)  # no chance to release
    holder.wait()
    assert read_holder(run_dir / LOCK_NAME).pid == holder.pid
    # The command line takes it over (teach with teach.enabled=false then stops with a config error, exit 2).
    out = cli("teach", "--config", "configs/demo_cpu.yaml", f"run.dir={run_dir}")
    assert f"run lock: taking over the stale lock of 'selfrefine run' (pid {holder.pid} on host " \
           f"{socket.gethostname()}" in out.stderr and "that process is gone" in out.stderr
    assert "key 'teach.enabled' is false" in out.stderr and out.returncode == 2
    assert not (run_dir / LOCK_NAME).exists()  # released when the command ended


def test_a_reused_pid_is_told_apart_by_its_start_time(tmp_path):
    other = subprocess.Popen(["sleep", "60"])  # a live process that is not the lock's holder
    try:
        lock = {"host": socket.gethostname(), "pid": other.pid, "pid_start": process_start(other.pid) - 1,
                "boot_id": None, "started": time.time(), "command": "run", "token": "t"}
        (tmp_path / LOCK_NAME).write_text(json.dumps(lock))
        said = []
        RunLock(tmp_path, "run", say=said.append).acquire().release()
        assert said == [f"run lock: taking over the stale lock of 'selfrefine run' (pid {other.pid} on host "
                        f"{socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(lock['started']))}): "
                        f"pid {other.pid} now belongs to another program"]
        # With its real start time the same process is a live holder: refused.
        lock["pid_start"] += 1
        (tmp_path / LOCK_NAME).write_text(json.dumps(lock))
        with pytest.raises(RunDirLocked, match=f"pid {other.pid}"):
            RunLock(tmp_path, "run").acquire()
    finally:
        other.kill()
        other.wait()


def test_a_lock_from_another_host_is_refused_with_the_file_to_delete(tmp_path):
    lock = {"host": "node-17", "pid": 4242, "pid_start": 1, "boot_id": "x", "started": time.time(),
            "command": "sweep", "token": "t"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(lock))
    with pytest.raises(RunDirLocked) as e:
        RunLock(tmp_path, "run").acquire()
    assert "'selfrefine sweep' (pid 4242 on host node-17" in str(e.value)
    assert f"delete {tmp_path.resolve() / LOCK_NAME}" in str(e.value)
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == lock


def test_an_empty_lock_is_refused_while_young_and_taken_over_when_old(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text("")
    with pytest.raises(RunDirLocked, match="being written"):
        RunLock(tmp_path, "run").acquire()
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    said = []
    lock = RunLock(tmp_path, "run", say=said.append).acquire()
    assert "empty or unreadable" in said[0] and read_holder(path).pid == os.getpid()
    lock.release()


def test_processes_started_by_the_holder_proceed_and_others_are_refused(tmp_path):
    """``selfrefine run`` starts ``selfrefine sft`` learners on its own directory; a sweep drives variants
    in directories under its own. Both inherit the token; a process without it is refused."""
    sweep = tmp_path / "sweep"
    with hold_run_dir(sweep, "sweep") as held:
        child = textwrap.dedent("""
            import sys
            from selfrefine_dist.run_lock import hold_run_dir
            for d in sys.argv[1:]:
                with hold_run_dir(d, "sft"):
                    pass
            print("ok")
        """)
        run = [sys.executable, "-c", child, str(sweep), str(sweep / "variant_a")]
        out = subprocess.run(run, capture_output=True, text=True, env=dict(os.environ))  # inherits the token
        assert out.stdout.strip() == "ok", out.stderr
        assert read_holder(sweep / LOCK_NAME).token == held.holder.token  # the child did not release it
        assert not (sweep / "variant_a" / LOCK_NAME).exists()
        stranger = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        for d in (sweep, sweep / "variant_a"):
            out = subprocess.run(run[:3] + [str(d)], capture_output=True, text=True, env=stranger)
            assert out.returncode != 0 and "RunDirLocked" in out.stderr and f"pid {os.getpid()}" in out.stderr
        out = cli("run", "--config", "configs/demo_cpu.yaml", f"run.dir={sweep / 'variant_a'}", env=stranger)
        assert out.returncode == 2 and "lies inside a directory driven by 'selfrefine sweep'" in out.stderr


def _race(run_dir: str, start: float, results) -> None:
    os.environ.pop(TOKEN_ENV, None)
    time.sleep(max(0.0, start - time.time()))
    try:
        lock = RunLock(Path(run_dir), "run", say=lambda msg: None).acquire()
    except RunDirLocked:
        results.put("refused")
        return
    results.put("held")
    time.sleep(3)  # hold it while the others try
    lock.release()


def test_racing_drivers_over_a_stale_lock_one_wins(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "pid_start": 1,
                                                  "boot_id": None, "started": 0.0, "command": "run", "token": "t"}))
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    start = time.time() + 1.0
    procs = [ctx.Process(target=_race, args=(str(tmp_path), start, results)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["held"] + ["refused"] * 5
    assert not (tmp_path / LOCK_NAME).exists()
