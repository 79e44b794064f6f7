"""train/memory.py: the allocator setting that gives a learner's freed blocks back to the OS, and the
peak-RSS reading every stage logs. Each check runs in a fresh process (the setting is per process)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from selfrefine_dist.train.memory import CPU_KERNEL_CACHE_ENV, GIB, peak_rss_bytes, reset_peak_rss

FRAGMENT = r"""
import json, sys
import torch
from selfrefine_dist.train.memory import return_large_blocks_to_os, trim_heap
set_it = sys.argv[1] == "1"
changed = return_large_blocks_to_os() if set_it else False
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
big = torch.ones(4 << 20)
del big  # a freed 16 MiB block: glibc raises its mmap threshold to that size (its ceiling is 32 MiB)
blocks = [torch.ones(1 << 19) for _ in range(200)]  # 200 blocks of 2 MiB (400 MiB), touched
held = rss()
del blocks[::2]  # free every other one: interleaved holes, nothing to trim from the heap's top
freed = rss()
trimmed = trim_heap()
print(json.dumps({"changed": changed, "released_mib": (held - freed) / 2**20,
                  "trimmed": trimmed, "released_by_trim_mib": (freed - rss()) / 2**20}))
"""


def released_mib(set_threshold: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", FRAGMENT, "1" if set_threshold else "0"], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_go_back_to_the_os_with_the_fixed_threshold_or_a_trim():
    with_threshold, without = released_mib(True), released_mib(False)
    assert with_threshold["changed"] is True
    assert with_threshold["released_mib"] > 150  # about 200 MiB freed: returned at once
    assert without["released_mib"] < 50  # the heap keeps them: what the learners ran into
    assert without["trimmed"] is True and without["released_by_trim_mib"] > 150  # until malloc_trim


MODES = r"""
import json, sys
import torch
from selfrefine_dist.train.memory import set_cpu_memory, trim_after_step, trim_heap
set_cpu_memory(sys.argv[1])
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
blocks = [torch.ones(1 << 19) for _ in range(200)]  # 200 blocks of 2 MiB, touched: a step's activations
held = rss()
del blocks[::2]
freed = rss()
after_step = trim_after_step()
stepped = rss()
trim_heap()  # the end of a round
print(json.dumps({"released_mib": (held - freed) / 2**20, "trimmed_after_step": after_step,
                  "released_after_step_mib": (freed - stepped) / 2**20, "released_by_round_mib": (stepped - rss()) / 2**20}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cpu_memory_modes_free_at_once_or_keep_blocks_for_the_next_step():
    """lean: 2 MiB blocks are mapped on their own, freed at once, and the heap is trimmed after each step;
    fast: they stay in the heap for the next step's activations until the round's trim."""
    runs = {mode: json.loads(subprocess.run([sys.executable, "-c", MODES, mode], capture_output=True, text=True,
                                            check=True).stdout.strip().splitlines()[-1]) for mode in ("lean", "fast")}
    assert runs["lean"]["released_mib"] > 150 and runs["lean"]["trimmed_after_step"] is True
    assert runs["fast"]["released_mib"] < 50 and runs["fast"]["trimmed_after_step"] is False
    assert runs["fast"]["released_after_step_mib"] < 50 and runs["fast"]["released_by_round_mib"] > 150


def test_unknown_cpu_memory_mode_names_the_key():
    from selfrefine_dist.train.memory import set_cpu_memory

    with pytest.raises(ValueError, match="distributed.cpu_memory: 'small' is not one of"):
        set_cpu_memory("small")


def test_peak_rss_rises_with_an_allocation_and_resets():
    reset_peak_rss()
    before = peak_rss_bytes()
    block = bytearray(256 << 20)  # 256 MiB, touched (zero-filled)
    assert peak_rss_bytes() - before > 200 << 20
    del block
    reset_peak_rss()
    assert peak_rss_bytes() < before + (128 << 20) or sys.platform != "linux"
    assert peak_rss_bytes() / GIB > 0


KERNEL_CACHE_FRAGMENT = r"""
import json, sys
import torch
from selfrefine_dist.train.memory import bound_cpu_kernel_caches, trim_heap
chosen = bound_cpu_kernel_caches() if sys.argv[1] == "1" else {}
torch.set_num_threads(1)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
w = torch.randn(1536, 576, dtype=torch.bfloat16, requires_grad=True)
(torch.randn(8, 576, dtype=torch.bfloat16) @ w.t()).sum().backward()
trim_heap()
before = rss()
for n in range(100, 100 + int(sys.argv[2])):  # sequence lengths as a learner meets them: forward and backward
    x = torch.randn(n, 576, dtype=torch.bfloat16, requires_grad=True)
    (x @ w.t()).sum().backward()
trim_heap()
print(json.dumps({"chosen": chosen, "kept_mib": (rss() - before) / 2**20}))
"""


def kept_by_matmul_shapes(*runs, shapes: int = 150) -> list:
    """One process per (bounded, env) run, all at once (each single-threaded): what each kept after the
    matmuls of ``shapes`` sequence lengths."""
    procs = [subprocess.Popen([sys.executable, "-c", KERNEL_CACHE_FRAGMENT, "1" if bounded else "0", str(shapes)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for bounded, env in runs]
    outs = [proc.communicate() for proc in procs]
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and calls glibc's malloc_trim")
def test_bounded_kernel_caches_keep_memory_flat_across_matmul_shapes():
    import os

    import torch

    env = {k: v for k, v in os.environ.items() if k not in CPU_KERNEL_CACHE_ENV}
    # oneDNN runs no bf16 matmul on an AVX2-only CPU (such a CPU kept 1 MiB): the settings alone are checked there
    shapes = 0 if torch.backends.cpu.get_cpu_capability() == "AVX2" else 150
    # the third: a capacity the user set is left alone
    unbounded, bounded, user = kept_by_matmul_shapes((False, env), (True, env),
                                                     (True, dict(env, LRU_CACHE_CAPACITY="1024")), shapes=shapes)
    assert bounded["chosen"] == CPU_KERNEL_CACHE_ENV
    assert user["chosen"] == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32"}
    if shapes == 0:
        pytest.skip("an AVX2-only CPU: bf16 matmuls do not go through oneDNN's per-shape kernels")
    if unbounded["kept_mib"] < 64:
        pytest.skip(f"this CPU's bf16 matmuls keep no per-shape kernels ({unbounded['kept_mib']:.0f} MiB kept)")
    assert bounded["kept_mib"] < unbounded["kept_mib"] / 3, (bounded, unbounded)
