"""Metrics to ``<run dir>/metrics.jsonl`` always, and to Weights & Biases when enabled.

Only the main process writes. Other ranks get the same object, whose calls do
nothing, so the training loop has no ``if rank == 0`` around logging.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Optional


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        enabled: bool = True,
        wandb_mode: str = "disabled",
        wandb_project: str = "selfrefine-dist",
        wandb_run_name: Optional[str] = None,
        config: Optional[dict] = None,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb_run = None
        if enabled and wandb_mode != "disabled":
            import wandb

            self._wandb_run = wandb.init(
                project=wandb_project, name=wandb_run_name or Path(run_dir).name, dir=str(run_dir),
                mode=wandb_mode, config=config, resume="allow",
            )

    def log(self, metrics: Dict[str, Any], step: Optional[int] = None, stage: str = "") -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), "stage": stage, "step": step}
        record.update({k: _plain(v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb_run is not None:
            prefix = f"{stage}/" if stage else ""
            self._wandb_run.log({prefix + k: v for k, v in metrics.items() if _is_number(v)})

    def finish(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


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
