"""Ask a math-verify helper process, with a deadline that holds in any thread.

Why a process: some answers keep math-verify busy for minutes ("9^9^9", "10^{10^{10^{10}}}",
"(10^{10})!"), math-verify's own timeout is SIGALRM, which works only in a process's main
thread, and our callers include worker threads (Ray actors, thread pools). A separate process
can always be stopped. ``MathVerifyProcess.compare`` sends one request to ``math_worker.py`` and
waits at most ``timeout_s`` for the reply. The helper stops Python-level work itself at the
deadline (its own SIGALRM, in its own main thread) and lives on; if it has not answered
``KILL_GRACE_S`` later (work stuck in one long C call, which no signal interrupts), it is
killed and the next request starts a fresh one.

Cost, measured on the 2-core CPU machine: starting the helper takes 0.6 s (1.2 s cold), paid on
the first request of each calling process and after each kill, and not counted against
``timeout_s``; a request then takes 1-3 ms, the same as calling math-verify in-process.

One helper serves a whole process: requests from several threads take turns (a lock), so a
call may first wait for the requests queued before it, each bounded by its own deadline.

    >>> reply = shared_math_process().compare("1,234 apples", "1234", timeout_s=5)
    >>> reply["equal"]
    True
"""
from __future__ import annotations

import atexit
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

_WORKER_SCRIPT = Path(__file__).with_name("math_worker.py")
# Importing sympy on a loaded 2-core machine can take several seconds.
STARTUP_TIMEOUT_S = 60.0
# The helper times itself out at the deadline; the kill comes only this much later, for work
# stuck in C code that its own timer cannot interrupt.
KILL_GRACE_S = 0.5


class MathProcessError(RuntimeError):
    """The helper process failed to start or died without answering."""


class MathVerifyProcess:
    """A lazily started ``math_worker.py`` process, restarted after every kill or crash."""

    def __init__(self, command: Sequence[str] | None = None) -> None:
        """command: how to start the helper; ``python math_worker.py`` unless given (tests give
        stand-ins that hang)."""
        self._command = list(command) if command else [sys.executable, str(_WORKER_SCRIPT)]
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._unread = b""  # bytes read from the helper past the last complete line

    def compare(self, answer_text: str, gold: str, timeout_s: float) -> dict | None:
        """math_worker.compare's reply, or None if the deadline passed.

        Other replies: {"error": message} when math-verify raised, {"crashed": True} when the
        helper died on this request (a fresh one serves the next). Raises MathProcessError if
        the helper cannot be started.
        """
        request = {"answer_text": answer_text, "gold": gold, "deadline_s": timeout_s}
        with self._lock:
            self._ensure_started()
            try:
                self._send(request)
                reply = self._receive(deadline=time.monotonic() + timeout_s + KILL_GRACE_S)
            except MathProcessError:
                return {"crashed": True}
            except BaseException:  # e.g. KeyboardInterrupt: a reply may still be on its way
                self._stop()
                raise
            if reply is None:  # stuck beyond its own timer, in C code: only a kill stops it
                self._stop()
                return None
            if reply.get("timed_out"):
                return None
            return reply

    def start(self) -> None:
        """Start the helper now (a caller may do so when it sets up, instead of on its first
        request). Raises MathProcessError if it does not start."""
        with self._lock:
            self._ensure_started()

    @property
    def pid(self) -> int | None:
        """The helper's process id, or None when no helper is running."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def close(self) -> None:
        """Stop the helper (it would also stop by itself when this process exits)."""
        with self._lock:
            self._stop()

    # -- the helper's life ---------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        self._stop()
        # stderr is inherited: the helper's rare messages land in the caller's log.
        self._process = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ready = self._receive(deadline=time.monotonic() + STARTUP_TIMEOUT_S)
        if not ready or not ready.get("ready"):
            self._stop()
            raise MathProcessError(f"the math-verify helper {self._command} did not start")

    def _stop(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            for pipe in (self._process.stdin, self._process.stdout):
                pipe.close()
        self._process = None
        self._unread = b""

    def _send(self, request: dict) -> None:
        # ensure_ascii (json's default) keeps lone surrogates and other junk transportable.
        line = (json.dumps(request) + "\n").encode("ascii")
        try:
            self._process.stdin.write(line)
            self._process.stdin.flush()
        except BrokenPipeError as error:
            self._stop()
            raise MathProcessError("the math-verify helper died") from error

    def _receive(self, deadline: float) -> dict | None:
        """The helper's next reply line, or None if ``deadline`` passes first."""
        stdout = self._process.stdout
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while b"\n" not in self._unread:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(timeout=remaining):
                    return None
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    self._stop()
                    raise MathProcessError("the math-verify helper died without answering")
                self._unread += chunk
        line, _, self._unread = self._unread.partition(b"\n")
        return json.loads(line)


# -- one helper per process ---------------------------------------------------------------------

_shared: MathVerifyProcess | None = None
_shared_lock = threading.Lock()


def shared_math_process() -> MathVerifyProcess:
    """This process's helper (created on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = MathVerifyProcess()
        return _shared


def _forget_parent_helper() -> None:
    """In a forked child the parent's helper and locks are not ours: start afresh."""
    global _shared, _shared_lock
    _shared = None
    _shared_lock = threading.Lock()


def _close_shared() -> None:
    if _shared is not None:
        _shared.close()


os.register_at_fork(after_in_child=_forget_parent_helper)
atexit.register(_close_shared)
