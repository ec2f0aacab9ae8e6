"""Peak resident memory of this process, from /proc (Linux): how much a step added above what was resident."""

from __future__ import annotations


def rss_mib(field: str) -> float:
    """A /proc/self/status field in MiB: ``VmRSS`` (resident now) or ``VmHWM`` (peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Reset VmHWM to the current resident size (no-op where the kernel does not allow it)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
