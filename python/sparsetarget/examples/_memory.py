"""Resident memory of this process from /proc (Linux): how much a step added above what was resident. NumPy- and
torch-free, so the benchmarks use it too."""

from __future__ import annotations


def rss_mib(field: str = "VmRSS") -> float:
    """A /proc/self/status field in MiB (``VmRSS`` now, ``VmHWM`` peak since the last reset); NaN elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak() -> None:
    """Reset the peak resident size to the current one (Linux; no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
