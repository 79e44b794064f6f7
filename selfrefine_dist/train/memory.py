"""Peak resident memory of this process (Linux VmHWM), for every stage's metrics, and the settings that
keep a CPU learner's memory flat: freed memory back to the OS, bounded CPU kernel caches."""
from __future__ import annotations

import functools

GIB = 1024**3
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
LARGE_BLOCK_BYTES = 1 << 20


def return_large_blocks_to_os(threshold_bytes: int = LARGE_BLOCK_BYTES) -> bool:
    """Serve every allocation of ``threshold_bytes`` or more with its own mapping, so that freeing it
    gives the memory back to the OS at once.

    glibc's threshold starts at 128 KiB but rises to the largest block freed so far (up to 32 MiB);
    after the first freed weight tensor, a CPU learner's weight-, gradient- and optimizer-sized blocks
    come from the heap, where freed ones stay resident: the reference model freed after its pass, the
    optimizer state reset at each round and every step's activations then keep the process at its
    high-water mark. A fixed threshold turns the rise off. False where the C library is not glibc
    (nothing changes there).
    """
    libc = _glibc()
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes))) if libc is not None else False


# distributed.cpu_memory: how a CPU learner hands freed memory back to the OS.
#   lean  blocks of 1 MiB and more mapped on their own (freed at once) and the heap trimmed after every
#         micro-step (each forward/backward part): the lowest resident memory (benchmarks/dpo.py's peak).
#         Trimming between the parts of a step too, not only after the optimizer step, took the DPO bench's
#         peak from ~3.59 to ~3.48 GiB for ~5% longer steps (2-core AMD EPYC, fp32, one pair a forward).
#   fast  blocks under 64 MiB from the heap, kept for the next step's activations, the heap trimmed at
#         the end of each round's training. Every lean step page-faults its activations in again: on a
#         2-core AMD EPYC (fp32, SmolLM2-135M, 4 pairs a forward) 1.5 s of kernel time a 5 s step, against
#         0.4 s (steps ~1.2x faster); the DPO bench's peak 3.60 GiB against 3.54. The reference pass packs
#         its sequences in rows of 1024 tokens only under fast (``refine/learner.py``).
CPU_MEMORY_MODES = {"lean": 1 << 20, "fast": 64 << 20}  # mode -> mmap threshold (bytes)
_trim_each_step = True


def set_cpu_memory(mode: str) -> None:
    """Apply ``distributed.cpu_memory`` (``CPU_MEMORY_MODES``) to this process; call before the first step."""
    global _trim_each_step
    if mode not in CPU_MEMORY_MODES:
        raise ValueError(f"distributed.cpu_memory: {mode!r} is not one of {sorted(CPU_MEMORY_MODES)}")
    return_large_blocks_to_os(CPU_MEMORY_MODES[mode])
    _trim_each_step = mode == "lean"


def trim_after_step() -> bool:
    """After each micro-step on CPU: trim the heap when the process runs ``lean``; returns whether it did."""
    return trim_heap() if _trim_each_step else False


# oneDNN's primitive cache and ideep's (torch's oneDNN wrapper) computation cache: entries per matmul shape.
CPU_KERNEL_CACHE_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32", "LRU_CACHE_CAPACITY": "32"}


def bound_cpu_kernel_caches() -> dict:
    """Keep the kernels of 32 matmul shapes instead of 1024 (each cache's default), unless the environment
    already sets a capacity; returns the variables set. Call before the process's first matmul.

    On CPUs that multiply bf16 through oneDNN, each new [tokens x hidden] shape gets JIT-compiled kernels
    (about 1-2 MB with their buffers), kept in two caches of 1024 entries. A learner sees a new shape for
    every sequence length, so its memory climbs by hundreds of MB within a round and further each round
    (``benchmarks/dpo.py``: 0.3 GiB of a DPO learner's peak). One pair's forward and backward use a
    dozen shapes, reused by every layer: 32 entries keep them all, at the same speed.
    """
    import os

    chosen = {k: v for k, v in CPU_KERNEL_CACHE_ENV.items() if k not in os.environ}
    os.environ.update(chosen)
    return chosen


def trim_heap() -> bool:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``): blocks under the mmap threshold
    freed in the middle of the heap stay resident otherwise, and the next step's peak comes on top of them.
    CPU learners call it after each micro-step under lean (``engine.optimizer_step``). False where the C library
    is not glibc."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


@functools.cache
def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # both glibc's; absent elsewhere (musl, macOS)
        return libc
    except (OSError, AttributeError):
        return None


def reset_peak_rss() -> None:
    """Start a new peak resident memory: Linux resets VmHWM when "5" is written to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the peak then counts from the process start
        pass


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM) since ``reset_peak_rss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
