"""Peak resident memory of this process, from /proc (Linux): the helpers of the examples (no torch import)."""

from sparsetarget.examples._memory import reset_peak, rss_mib

__all__ = ["reset_peak", "rss_mib"]
