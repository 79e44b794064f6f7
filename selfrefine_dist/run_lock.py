"""One writer per run directory: ``<run>/.lock`` names the process that drives the run.

    with hold_run_dir(run_dir, "run"):     # refused (RunDirLocked) while another live driver holds it
        run_pipeline(...)

The lock file is created with ``O_EXCL`` and holds JSON: host, pid, the process's start time
(``/proc/<pid>/stat`` field 22, so a pid reused by another program is told apart), the boot id,
the command and a random token. While it is held the token is exported as ``SELFREFINE_RUN_LOCK``:
the processes a driver starts on the same run directory (``selfrefine run`` starts ``selfrefine
sft`` learner processes; a sweep does for each variant under its directory) inherit it and proceed
without a lock of their own when it matches the lock of the directory or of a directory above it.

A lock left by a driver that is gone (same host, and its pid not alive, started at another time, or
from before a reboot) is stale: it is reported and taken over. A lock from another host cannot be
checked from here and is refused; the message says which file to delete once that process is gone.
Released on exit and on exceptions; a SIGKILL leaves a stale lock, which the next driver takes over.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

LOCK_NAME = ".lock"
TOKEN_ENV = "SELFREFINE_RUN_LOCK"
UNREADABLE_GRACE_S = 30.0  # a lock file without content is being written, or its writer died while writing it


class RunDirLocked(RuntimeError):
    """Another live process drives this run directory (or the sweep directory around it)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_start: Optional[int]  # clock ticks after boot (/proc/<pid>/stat field 22); None where /proc is absent
    boot_id: Optional[str]
    started: float  # wall time the lock was taken
    command: str
    token: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"'selfrefine {self.command}' (pid {self.pid} on host {self.host}, since {when})"


def process_start(pid: int) -> Optional[int]:
    """Start time of process ``pid`` in clock ticks after boot, or None if there is no such process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def why_stale(holder: Holder) -> Optional[str]:
    """Why ``holder``'s lock is left over from a process that is gone, or None if it may be alive."""
    if holder.host != socket.gethostname():
        return None  # another machine's process cannot be checked from here
    boot = _boot_id()
    if holder.boot_id and boot and holder.boot_id != boot:
        return "the machine has rebooted since"
    if not _pid_alive(holder.pid):
        return "that process is gone"
    start = process_start(holder.pid)
    if holder.pid_start is not None and start is not None and start != holder.pid_start:
        return f"pid {holder.pid} now belongs to another program"
    return None


def read_holder(lock: Path) -> Optional[Holder]:
    """The lock's holder; None when the file is empty or unreadable (being written, or cut off)."""
    try:
        return Holder(**json.loads(lock.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _held_above(run_dir: Path, token: Optional[str]) -> Optional[Holder]:
    """The live holder of a lock in a directory above ``run_dir`` (a sweep's), unless it is ours (``token``)."""
    for parent in run_dir.parents:
        holder = read_holder(parent / LOCK_NAME)
        if holder is not None and holder.token != token and why_stale(holder) is None:
            return holder
    return None


def _inherited(run_dir: Path, token: Optional[str]) -> bool:
    """True when our parent process holds the lock of ``run_dir`` or of a directory above it."""
    if not token:
        return False
    return any((holder := read_holder(d / LOCK_NAME)) is not None and holder.token == token
               for d in (run_dir, *run_dir.parents))


class RunLock:
    """The lock of one run directory, taken by ``acquire`` and given back by ``release``."""

    def __init__(self, run_dir: Path, command: str, say=None):
        self.run_dir = Path(run_dir).resolve()
        self.path = self.run_dir / LOCK_NAME
        self.command = command
        self.say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.holder: Optional[Holder] = None  # set while this process holds the lock
        self._saved_env: Optional[str] = None

    def acquire(self) -> "RunLock":
        inherited = os.environ.get(TOKEN_ENV)
        if _inherited(self.run_dir, inherited):
            return self  # started by the driver that holds it: nothing to take, nothing to release
        above = _held_above(self.run_dir, inherited)
        if above is not None:
            raise RunDirLocked(f"{self.run_dir} lies inside a directory driven by {above.describe()}; "
                               f"wait for it to finish or stop it")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = Holder(socket.gethostname(), os.getpid(), process_start(os.getpid()), _boot_id(), time.time(),
                    self.command, uuid.uuid4().hex)
        for _ in range(3):  # a stale lock taken over: try again once it is gone
            if self._create(me):
                self.holder = me
                self._saved_env = os.environ.get(TOKEN_ENV)
                os.environ[TOKEN_ENV] = me.token  # for the processes this driver starts on the directory
                return self
            self._take_over_if_stale()
        raise RunDirLocked(f"{self.path}: could not take the lock (others keep taking it); try again")

    def _create(self, me: Holder) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, json.dumps(asdict(me)).encode())
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise OSError(e.errno, f"could not write the run lock {self.path}: {e.strerror}") from e
        os.close(fd)
        return True

    def _take_over_if_stale(self) -> None:
        """Remove the lock if its holder is gone (reported); raise RunDirLocked if it may be alive.

        Take-overs are serialised by an flock on the directory, and the lock is read again under it:
        two drivers that both found the same stale lock cannot both remove it, nor remove the lock
        the first of them then created.
        """
        dir_fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            holder = read_holder(self.path)
            if holder is None:
                try:
                    age = time.time() - self.path.stat().st_mtime
                except FileNotFoundError:
                    return  # released meanwhile
                if age < UNREADABLE_GRACE_S:
                    raise RunDirLocked(f"{self.path} is being written by another driver starting on this "
                                       f"directory; try again in a moment")
                self.say(f"run lock: taking over {self.path}: it is empty or unreadable and {age:.0f} s old "
                         f"(its writer died while writing it)")
            else:
                why = why_stale(holder)
                if why is None:
                    remote = holder.host != socket.gethostname()
                    raise RunDirLocked(
                        f"{self.run_dir} is in use by {holder.describe()}; one driver per run directory. Wait for "
                        f"it to finish or stop it" + (f"; if that process is gone (a process on host {holder.host} "
                                                      f"cannot be checked from here), delete {self.path}"
                                                      if remote else ""))
                self.say(f"run lock: taking over the stale lock of {holder.describe()}: {why}")
            self.path.unlink(missing_ok=True)
        finally:
            os.close(dir_fd)  # releases the flock

    def release(self) -> None:
        """Remove the lock if this process holds it (and it is still ours: never someone else's)."""
        if self.holder is None:
            return
        holder = read_holder(self.path)
        if holder is not None and holder.token == self.holder.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self._saved_env is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = self._saved_env
        self.holder = None


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, command: str) -> Iterator[RunLock]:
    """Hold ``run_dir``'s lock for the block (see the module docstring); raises RunDirLocked if it is taken."""
    lock = RunLock(run_dir, command).acquire()
    try:
        yield lock
    finally:
        lock.release()
