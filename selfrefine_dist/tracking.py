"""Metrics to ``<run dir>/metrics.jsonl`` always, and to Weights & Biases when enabled.

Only the main process writes. Other ranks get the same object, whose calls do
nothing, so the training loop has no ``if rank == 0`` around logging.

One run directory is one W&B run. Its id, name and group are kept in ``<run dir>/wandb_run.json``
(the id made once), and every process that logs for the directory (the ``selfrefine run`` driver or a
sweep, rank 0 of the SFT learners they start, a driver started again to resume) opens that run with
``resume="allow"``; a learner that names no run or group gets the driver's. A W&B run is held by one
process at a time (wandb.init fails with "run ID ... is in use"), so the driver calls
:meth:`MetricsLogger.suspend` before it starts the learners; its next :meth:`MetricsLogger.log` takes
the run back.

W&B's step is the record's line number in metrics.jsonl: it keeps increasing from one process to the
next, where W&B's own counter would start again at 0 in each offline segment (offline, every process
writes its own ``wandb/offline-run-*`` folder under the same run id).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

RUN_FILE = "wandb_run.json"


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        enabled: bool = True,
        wandb_mode: str = "disabled",
        wandb_project: str = "selfrefine-dist",
        wandb_run_name: Optional[str] = None,
        config: Optional[dict] = None,
        group: Optional[str] = None,
    ):
        """``config``: the resolved config as a plain dict (:func:`config_dict`); ``group``: the W&B
        group (a sweep's variants share one). ``wandb_run_name`` and ``group`` left at None take the
        run directory's (see ``wandb_run.json``)."""
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb_run = None
        self._wandb_init: Optional[dict] = None  # wandb.init arguments; None: no W&B in this process
        self._config = config
        self._next_step = 0
        self.wandb_run_id: Optional[str] = None
        if enabled and wandb_mode != "disabled":
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            run, made_here = _run_identity(Path(run_dir), wandb_run_name, group)
            self.wandb_run_id = run["id"]
            self._wandb_init = dict(project=wandb_project, dir=str(run_dir), mode=wandb_mode, resume="allow", **run)
            self._open_wandb(new_run=made_here)

    def _open_wandb(self, new_run: bool) -> None:
        import wandb

        # Records another process appended while this one was suspended come before ours.
        self._next_step = _count_lines(self.path)
        run = wandb.init(**self._wandb_init, config=self._config if new_run else None)
        if not new_run and self._config:
            # Resuming: the run may hold an older config (a rerun with overrides); this one wins.
            run.config.update(self._config, allow_val_change=True)
        self._wandb_run = run

    def log(self, metrics: Dict[str, Any], step: Optional[int] = None, stage: str = "") -> None:
        if not self.enabled:
            return
        if self._wandb_run is None and self._wandb_init is not None:
            self._open_wandb(new_run=False)  # suspended: take the run back
        record = {"time": time.time(), "stage": stage, "step": step}
        record.update({k: _plain(v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb_run is not None:
            prefix = f"{stage}/" if stage else ""
            numbers = {prefix + k: v for k, v in record.items() if k in metrics and _is_number(v)}
            if numbers:
                self._wandb_run.log(numbers, step=self._next_step)
        self._next_step += 1

    def suspend(self) -> None:
        """Let go of the W&B run so that another process can resume it; the next ``log`` takes it back."""
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def finish(self) -> None:
        self.suspend()
        self._wandb_init = None


def config_dict(cfg: Any) -> dict:
    """A dataclass config (``selfrefine_dist.config.Config``) as plain nested dicts and lists."""
    return dataclasses.asdict(cfg)


def _run_identity(run_dir: Path, name: Optional[str], group: Optional[str]) -> Tuple[dict, bool]:
    """``({"id", "name", "group"}, made_here)``: the run directory's W&B run, kept in ``wandb_run.json``.

    The first process makes the id. A name or group given later replaces the stored one; a process
    that gives none (the SFT learners) takes the stored one, so no segment renames or regroups the run.
    """
    path = run_dir / RUN_FILE
    if not path.is_file():
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        made = {"id": run_id, "name": name or run_dir.name, "group": group}
        try:
            with path.open("x") as f:  # exclusive create: two processes never both make an id
                json.dump(made, f)
            return made, True
        except FileExistsError:
            pass
    stored = json.loads(path.read_text())
    run = {"id": stored["id"], "name": name or stored["name"], "group": group or stored["group"]}
    if run != stored:
        tmp = path.with_name(f"{RUN_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(run))
        os.replace(tmp, path)
    return run, False


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open("rb") as f:
        return sum(1 for _ in f)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        return v.item()
    return v


def read_metrics(run_dir: Path, stage: Optional[str] = None) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if stage is None or r.get("stage") == stage]
