"""Checkpoints that resume exactly: model, optimizer, scheduler (DeepSpeed), RNG, data position.

Layout: ``<root>/step_00000012/`` holds DeepSpeed's files (every rank's
partition), ``rng_rank<r>.pt`` for each rank and ``trainer_state.json``; the
newest finished checkpoint is named in ``<root>/latest_step``, written last, so
a checkpoint cut off half-way is never resumed from.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from selfrefine_dist.train import distributed as dist


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, root: Path, step: int, trainer_state: dict, keep: int) -> Path:
    root = Path(root)
    tag = _tag(step)
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(rng_state(), root / tag / f"rng_rank{dist.rank()}.pt")
    dist.barrier()
    if dist.is_main():
        (root / tag / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        (root / "latest_step").write_text(str(step))
        finished = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in finished[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / tag


def latest_step(root: Path) -> Optional[int]:
    marker = Path(root) / "latest_step"
    return int(marker.read_text()) if marker.is_file() else None


def load_checkpoint(engine, root: Path, step: int) -> dict:
    """Restore engine state and this rank's RNG; returns the trainer state."""
    root = Path(root)
    tag = _tag(step)
    path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {root / tag}")
    set_rng_state(torch.load(root / tag / f"rng_rank{dist.rank()}.pt", weights_only=True))
    return json.loads((root / tag / "trainer_state.json").read_text())
