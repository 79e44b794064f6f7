"""Peak resident memory of this process (Linux VmHWM), for every stage's metrics."""
from __future__ import annotations

GIB = 1024**3


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
