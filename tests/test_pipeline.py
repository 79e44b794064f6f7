"""`selfrefine run` with no self-refine rounds on a tiny model: SFT, then evaluation of the base and SFT
models on a vLLM sampler actor (the rounds are tested in tests/refine/test_loop.py)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_run_writes_config_metrics_model_and_results(tiny_model_dir, tmp_path):
    cmd = [sys.executable, "-m", "selfrefine_dist.cli", "run", f"run.dir={tmp_path}",
           f"model.name_or_path={tiny_model_dir}", "model.dtype=fp32",
           "data.train=[{task: gsm8k, source: offline, split: test, limit: 8}]",
           "data.eval=[{task: gsm8k, source: offline, split: test, offset: 100, limit: 4},"
           " {task: obqa, source: offline, split: test, limit: 4}]",
           "sft.micro_batch_size=4", "sft.max_steps=2", "eval.max_new_tokens=8", "logging.progress_bars=false",
           "refine.rounds=0", "sampler.max_model_len=512"]
    out = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "sft" / "model" / "config.json").is_file()
    for label in ("base", "sft"):
        result = json.loads((tmp_path / "eval" / f"{label}.json").read_text())
        assert result["in_domain"]["total"] == 4 and result["out_of_domain"]["total"] == 4
        assert set(result["per_task"]) == {"gsm8k", "obqa"}
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "| base |" in table and "| sft |" in table and "in-domain" in table
    stages = {json.loads(l)["stage"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()}
    assert {"sft", "eval/base", "eval/sft", "timing"} <= stages
