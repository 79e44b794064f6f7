"""``python -m selfrefine_dist.benchmarks.round`` at a toy size: after an untimed warm-up, our two rounds (Ray,
a vLLM sampler actor, a DeepSpeed learner) and, where TRL is installed (the ``bench`` extra), the same rounds
as plain vLLM + TRL scripts; the stage table prints, each round's stages lie inside its wall time, both
sides train the same number of DPO steps."""
from __future__ import annotations

import importlib.util
import math
import re

import pytest

pytest.importorskip("vllm")
pytest.importorskip("deepspeed")

from selfrefine_dist.benchmarks import round as bench  # noqa: E402

pytestmark = pytest.mark.slow


def test_round_benchmark_runs_at_a_toy_size(tiny_model_dir, capsys):
    with_plain = importlib.util.find_spec("trl") is not None
    # A random model gets every chain_sum answer wrong: teacher_vs_incorrect pairs one path per question.
    bench.main(["--model", str(tiny_model_dir), "--dtype", "fp32", "--questions", "4", "--samples", "2",
                "--max-new-tokens", "8", "--rounds", "2", "--micro-batch", "2", "--cpus", "2", "--kv-cache-gib", "1",
                "--timeout", "600"] + ([] if with_plain else ["--ours-only"]))
    out = capsys.readouterr().out
    print(out)
    assert re.search(r"# Round benchmark: .* fp32, 4 chain_sum questions x 2 paths x 8 tokens", out), out
    assert re.search(r"warm-up: [\d.]+ s \(not counted\)", out), out  # both sides start from a warm page cache
    from test_dpo_bench import table_rows

    rows = {name: cells[1:] for name, cells in table_rows(out).items()}
    sides = 4 if with_plain else 2  # (plain, ours) x 2 rounds, or ours x 2 rounds
    for stage in bench.STAGES + ("**wall**",):
        assert len(rows[stage]) == sides, (stage, rows[stage])
        assert all(math.isfinite(float(x)) for x in rows[stage]), rows[stage]
    for col in range(sides):
        assert float(rows["**wall**"][col]) > 0
        # The named stages lie inside the round's wall time: what is left ("other") is not negative.
        assert all(float(rows[s][col]) >= -0.1 for s in bench.STAGES), [rows[s][col] for s in bench.STAGES]
        assert float(rows["reference pass"][col]) > 0
    assert rows["optimizer steps"] == ["2"] * sides  # 4 pairs in micro-batches of 2, on both sides
    assert rows["pairs trained"] == ["4"] * sides
    # 4 questions x 2 paths x at most 8 tokens a round, each side; the rate is those tokens over the sample stage
    assert all(0 < int(n) <= 64 for n in rows["sampled tokens"]), rows["sampled tokens"]
    for n, rate, seconds in zip(rows["sampled tokens"], rows["sampling tokens/s"], rows["sample"]):
        # the table rounds the seconds to 0.01 s (and the rate to 1 token/s)
        assert int(n) / (float(seconds) + 0.005) - 1 <= float(rate) <= int(n) / (float(seconds) - 0.005) + 1, \
            (n, rate, seconds)
    peaks = re.search(r"ours: [\d.]+ s for 2 rounds, peak RSS ([\d.]+) GiB, peak PSS ([\d.]+) GiB", out)
    assert peaks and 0 < float(peaks[2]) <= float(peaks[1]), out  # shared pages count once in PSS
    start = re.search(r"ours' round-1 start: ([\d.]+) s, of which ray.init ([\d.]+) s", out)
    assert start and 0 < float(start[2]) < float(start[1]), out  # Ray comes up inside ours' start
    if with_plain:
        assert re.search(r"ratio ours / plain: wall [\d.]+x .*; peak RSS [\d.]+x, peak PSS [\d.]+x", out)
