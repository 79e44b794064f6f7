"""A run's artifacts on disk: written whole or not at all, so a file that exists is a finished stage.

    <run>/rounds/round_01/samples.jsonl   every sampled path with its reward and model version
    <run>/rounds/round_01/sample_report.json  pass rate, pass@K, tokens/s of that sampling
    <run>/rounds/round_01/pairs.jsonl     the preference pairs built from them
    <run>/rounds/round_01/model/          the policy after the round (Hugging Face folder)
    <run>/rounds/round_01/summary.json    the round's metrics; written last: the round is done
    <run>/learner/                        DeepSpeed checkpoints, one per finished round
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, List


def round_dir(run_dir: Path, round_idx: int) -> Path:
    return Path(run_dir) / "rounds" / f"round_{round_idx:02d}"


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Write to a temporary name, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> List[dict]:
    rows = []
    with Path(path).open() as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    return rows


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())
