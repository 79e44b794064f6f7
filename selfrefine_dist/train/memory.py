"""Peak resident memory of this process (Linux VmHWM), for every stage's metrics, and the allocator
setting that lets a CPU learner give freed memory back."""
from __future__ import annotations

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


def trim_heap() -> bool:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``): blocks under the mmap threshold
    freed in the middle of the heap stay resident otherwise, and the next step's peak comes on top of them.
    CPU learners call it after each optimizer step (``engine.optimizer_step``). False where the C library
    is not glibc."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


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
