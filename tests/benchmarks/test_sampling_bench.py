"""``python -m selfrefine_dist.benchmarks.sampling`` at a toy size: raw vLLM (the peer, a plain process)
beside our vLLM sampler actor; the table prints and its figures are finite."""
import math
import re

import pytest

pytest.importorskip("vllm")

from selfrefine_dist.benchmarks import sampling as bench  # noqa: E402

pytestmark = pytest.mark.slow


def test_sampling_benchmark_runs_at_a_toy_size(tiny_model_dir, capsys):
    bench.main(["--model", str(tiny_model_dir), "--prompts", "2", "--samples", "2", "--max-new-tokens", "8",
                "--backends", "raw_vllm", "vllm", "--cpus", "2", "--kv-cache-gib", "1", "--timeout", "600"])
    out = capsys.readouterr().out
    rows = {m.group(1): m.groups() for m in re.finditer(
        r"^\| (raw_vllm|vllm) \| ([\d.]+) \| (\d+) \| ([\d.]+) \| (\d+) \| ([\d.]+)x \|$", out, re.M)}
    assert set(rows) == {"raw_vllm", "vllm"}, out
    assert rows["raw_vllm"][5] == "1.00"
    for method, (_, start_s, tokens, seconds, tokens_per_s, ratio) in rows.items():
        assert 0 < int(tokens) <= 2 * 2 * 8 and math.isfinite(float(ratio)) and float(ratio) > 0, method
