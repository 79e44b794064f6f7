"""``python -m selfrefine_dist.benchmarks.dpo`` at a toy size: every method finishes and the table's
figures are finite (TRL's row only where TRL is installed: the ``bench`` extra)."""
from __future__ import annotations

import importlib.util
import math
import os
import re
import sys

import pytest

pytest.importorskip("deepspeed")

from selfrefine_dist.benchmarks import dpo as bench  # noqa: E402

pytestmark = pytest.mark.slow


def table_rows(text: str) -> dict[str, list[str]]:
    """{first cell: cells} of the markdown table a benchmark prints (its header row left out)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("method", "stage") and not set(cells[0]) <= set("-:"):
            rows[cells[0]] = cells
    return rows


def test_dpo_benchmark_runs_at_a_toy_size(tiny_model_dir, capsys):
    methods = ["ours_stage0", "ours_2ranks"] + (["trl"] if importlib.util.find_spec("trl") else [])
    bench.main(["--model", str(tiny_model_dir), "--num-pairs", "8", "--micro-batch", "2", "--methods", *methods,
                "--timeout", "600"])
    out = capsys.readouterr().out
    assert re.search(r"# DPO benchmark: .* fp32, 8 pairs \(\d+ tokens\), micro-batch 2 pairs", out)
    rows = table_rows(out)
    assert set(rows) == set(methods)
    for method, cells in rows.items():
        assert not cells[1].startswith("skipped"), cells
        # steps | train s | tokens/s | median step tokens/s | tokens/CPU-s | peak RSS GiB | with save GiB |
        # 4 ratios to TRL | losses | load
        assert int(cells[1]) == (2 if method == "ours_2ranks" else 4)
        figures = [float(x) for x in cells[2:8]] + ([float(x) for x in cells[8:12]] if "trl" in rows else [])
        assert all(math.isfinite(x) and x > 0 for x in figures), cells


SHARED_MIB = 256
TWO_PROCESSES_SHARING = f"""
import mmap, os, time
shared = mmap.mmap(-1, {SHARED_MIB} << 20)  # anonymous and shared: a forked child maps the same pages
chunk = b"x" * (1 << 20)  # filled a MiB at a time: a 256 MiB bytes object would be private memory a PSS poll can catch
for offset in range(0, len(shared), len(chunk)):
    shared[offset:offset + len(chunk)] = chunk
if os.fork() == 0:
    sum(shared[i] for i in range(0, len(shared), 4096))  # the child reads every page: now in its RSS too
    time.sleep(3)
    os._exit(0)
time.sleep(3)
os.wait()
"""


def test_tree_peak_counts_a_shared_page_once_in_pss_and_per_process_in_rss():
    """Two processes mapping the same 256 MiB: summed RSS counts it twice, summed PSS once (``TreePeakRss``)."""
    run = bench.run_tree([sys.executable, "-c", TWO_PROCESSES_SHARING], {}, timeout_s=60)
    assert run.proc.returncode == 0, run.proc.stdout
    mib = 1 << 20
    assert run.peak_rss >= 2 * SHARED_MIB * mib, run.peak_rss / mib
    assert SHARED_MIB * mib <= run.peak_pss <= run.peak_rss - (SHARED_MIB - 16) * mib, (run.peak_rss / mib, run.peak_pss / mib)
    # a process's PSS is its RSS less the shares of its pages that other processes hold: never more
    import psutil

    assert 0 < bench.pss_bytes(os.getpid()) <= psutil.Process().memory_info().rss
