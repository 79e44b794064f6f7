"""Start learner processes: torchrun or the deepspeed launcher, one process per learner.

``selfrefine sft`` calls this when it is not already under a launcher; under
torchrun, the deepspeed launcher or Slurm the environment names the rank and
the command runs the training directly.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import List

from selfrefine_dist.train.distributed import free_port


def torch_extensions_dir() -> str:
    """Where DeepSpeed builds its ops (``deepspeed_shm_comm`` on CPU) for this Python environment, outside any
    clone so that reruns reuse them: ``~/.cache/selfrefine/torch_extensions/<first 12 hex of md5(sys.prefix)>``
    (the Makefile computes the same from ``$(VENV)``). An op's build files name the include paths of the
    torch it was built against, so two environments sharing one folder rebuild each other's op at every
    switch: 45 s of a learner's start on 2 cores, the first round after a CI run from another clone."""
    tag = hashlib.md5(sys.prefix.encode()).hexdigest()[:12]
    return str(Path.home() / ".cache" / "selfrefine" / "torch_extensions" / tag)


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def learner_env(nproc: int) -> dict:
    env = dict(os.environ)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
        # Without this each learner starts one thread per core and they fight (25x slower with 2 learners).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())  # DeepSpeed compiles ops on first use
    return env


def learner_command(launcher: str, nproc: int, master_port: int, cli_args: List[str]) -> List[str]:
    """The deepspeed launcher's command for ``deepspeed``, else torchrun's (``ray`` too: ``selfrefine sft`` / ``dpo``
    are the commands for users who launch processes themselves)."""
    port = str(master_port or free_port())
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(nproc), "--master_port", port,
                "--module", "selfrefine_dist.cli", *cli_args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", port, "-m", "selfrefine_dist.cli", *cli_args]


def run_learners(launcher: str, nproc: int, master_port: int, cli_args: List[str]) -> None:
    """Run ``selfrefine <cli_args>`` on ``nproc`` learner processes and wait for them."""
    cmd = learner_command(launcher, nproc, master_port, cli_args)
    print("launching:", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, env=learner_env(nproc))
    if result.returncode != 0:
        raise SystemExit(f"learners failed (exit {result.returncode}): {' '.join(cmd)}")
