"""Shared pieces of the launcher tests: the launchers' environment, free ports, a small config on the
tiny model, and "nodes" (process groups on this machine) that are started together and always reaped."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from selfrefine_dist.launch import torch_extensions_dir

REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = REPO / "launchers"
VENV_BIN = Path(sys.executable).parent  # the launchers call deepspeed, torchrun, ray, python by name

# Eight GSM8K training questions: with micro-batch 2 on 2 ranks an epoch is 2 optimizer steps, on 1 rank it
# would be 4, so the number of logged steps shows the world size.
CONFIG = """
model: {{name_or_path: {model}, dtype: fp32}}
data:
  train: [{{task: gsm8k, source: offline, split: test, limit: 8}}]
  eval: [{{task: gsm8k, source: offline, split: test, offset: 100, limit: 4}}]
  max_len: 512
sft: {{epochs: 1, micro_batch_size: 2, lr: 2.0e-3, lr_schedule: constant}}
dpo: {{beta: 0.1, lr: 1.0e-3, micro_batch_size: 2}}
eval: {{max_new_tokens: 8, include_base: false, bootstrap_samples: 100}}
logging: {{progress_bars: false}}
"""


def write_config(path: Path, model_dir) -> Path:
    path.write_text(CONFIG.format(model=model_dir))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(**extra: str) -> Dict[str, str]:
    """This environment with the venv's tools first on PATH, offline, one thread per learner process."""
    env = dict(os.environ)
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled", RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
    env.update(extra)
    return env


def metrics_rows(run_dir: Path, stage: str) -> List[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("stage") == stage]


# ---- processes: every process a test starts, and every process those start, is ended by the test

def _children() -> Dict[int, List[int]]:
    """Parent pid -> child pids, from /proc."""
    tree: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _pgid_members(pgid: int) -> List[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    members.append(int(entry))
            except OSError:
                pass
    return members


def process_tree(roots: Iterable[int]) -> List[int]:
    """``roots`` and all their descendants (a descendant may have left the roots' session, as a Ray
    job's driver does)."""
    tree, seen, todo = _children(), [], list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo.extend(tree.get(pid, []))
    return seen


def end_processes(pids: Sequence[int], grace_s: float = 10.0) -> None:
    """SIGTERM ``pids``, then SIGKILL whatever is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0.0)):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
        if not alive:
            return


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def end_process_group(pgid: int, grace_s: float = 10.0) -> None:
    """Every process of the group ``pgid`` (a launcher started in its own session) and their descendants."""
    end_processes(process_tree(_pgid_members(pgid)), grace_s)


class Node:
    """One "node": a launcher command in its own session, its output in a file."""

    def __init__(self, name: str, cmd: List[str], env: Dict[str, str], log: Path, cwd: Optional[Path] = None):
        self.name, self.cmd, self.log = name, cmd, log
        self._out = open(log, "w")
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            end_process_group(self.proc.pid)
        else:  # the launcher is done; anything it left behind in its group goes too
            end_process_group(self.proc.pid, grace_s=2.0)
        self.proc.wait()
        self._out.close()


def run_nodes(nodes: List[Node], timeout_s: float) -> List[int]:
    """Wait for every node's launcher; on a timeout end them all and fail with their output."""
    deadline = time.monotonic() + timeout_s
    try:
        codes = []
        for node in nodes:
            try:
                codes.append(node.proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{node.name} still running after {timeout_s:.0f} s\n" + report(nodes)) from None
        return codes
    finally:
        for node in nodes:
            node.close()


def report(nodes: List[Node], tail: int = 4000) -> str:
    return "\n".join(f"--- {n.name}: {' '.join(n.cmd)} (exit {n.proc.poll()})\n{n.output()[-tail:]}" for n in nodes)
