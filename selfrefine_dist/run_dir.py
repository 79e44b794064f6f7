"""The run directory: one folder holding a run's resolved config, metrics and artifacts.

    runs/<name>/config.yaml        the resolved config (what actually ran)
    runs/<name>/metrics.jsonl      one JSON object per logged step or stage
    runs/<name>/sft/               demonstrations report, checkpoints, exported model
    runs/<name>/eval/              evaluation results
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from selfrefine_dist.config import Config, to_yaml


def resolve_run_dir(cfg: Config, config_path: Optional[str]) -> Path:
    if cfg.run.dir:
        return Path(cfg.run.dir)
    stem = Path(config_path).stem if config_path else "default"
    return Path("runs") / stem


def write_resolved_config(cfg: Config, run_dir: Path) -> Path:
    """Write ``config.yaml``; a different earlier config is kept beside it, never overwritten."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    text = to_yaml(cfg)
    if path.is_file() and path.read_text() != text:
        path.rename(run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    path.write_text(text)
    return path
