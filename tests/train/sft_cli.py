"""Run `selfrefine sft` as a user would (CLI, launcher, learner processes) and read its metrics."""
import json
import os
import subprocess
import sys
from pathlib import Path

BASE = [
    "data.train=[{task: gsm8k, source: offline, split: test, limit: 24}]",
    "data.max_len=1024",
    "model.dtype=fp32",
    "sft.lr=2e-3", "sft.lr_schedule=constant", "sft.epochs=2",
    "distributed.nproc_per_node=2",
    "logging.progress_bars=false",
]


def run_cli(run_dir: Path, model_dir: Path, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "selfrefine_dist.cli", "sft", f"run.dir={run_dir}",
           f"model.name_or_path={model_dir}", *BASE, *overrides]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-6000:]}"


def sft_metrics(run_dir: Path) -> dict:
    """step -> metrics of the SFT stage; a step logged twice (resumed runs) keeps its last record."""
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["stage"] == "sft"}
