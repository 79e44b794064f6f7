"""``python -m selfrefine_dist.benchmarks.sft`` at a toy size: every method finishes and the table's
figures are finite (TRL's row only where TRL is installed: the ``bench`` extra)."""
from __future__ import annotations

import importlib.util
import math
import re

import pytest

pytest.importorskip("deepspeed")

from selfrefine_dist.benchmarks import sft as bench  # noqa: E402

pytestmark = pytest.mark.slow


def test_sft_benchmark_runs_at_a_toy_size(tiny_model_dir, capsys):
    from test_dpo_bench import table_rows

    methods = ["ours", "ours_stage0"] + (["trl"] if importlib.util.find_spec("trl") else [])
    bench.main(["--model", str(tiny_model_dir), "--num-examples", "8", "--micro-batch", "2", "--methods", *methods,
                "--timeout", "600"])
    out = capsys.readouterr().out
    match = re.search(r"# SFT benchmark: .* fp32, (\d+) examples \((\d+) tokens\) in (\d+) steps, micro-batch 2", out)
    assert match and int(match.group(3)) == int(match.group(1)) // 2 >= 2
    rows = table_rows(out)
    assert set(rows) == set(methods)
    for cells in rows.values():
        assert not cells[1].startswith("skipped"), cells
        assert int(cells[1]) == int(match.group(3))
        # steps | train s | tokens/s | median step tokens/s | peak RSS GiB | with save GiB | 3 ratios to TRL | ...
        figures = [float(x) for x in cells[2:7]] + ([float(x) for x in cells[7:10]] if "trl" in rows else [])
        assert all(math.isfinite(x) and x > 0 for x in figures), cells
