"""The core's BLAS thread count next to PyTorch's own thread pool.

A factored step is a few small BLAS calls (m x d x d products, a d x d or m x m solve), interleaved with torch
operations of the body and of the loss. When the core's OpenBLAS threads and torch's intra-op threads both try to
use every core, each pool busy-waits while the other works: on a 2-core machine one factored spherical-softmax
step at (D, d, m) = (100000, 128, 128) took 385 ms with 2 torch threads and 2 BLAS threads instead of 1.9 ms with 1
BLAS thread (``benchmarks/bench_lm_step.py``). So importing :mod:`sparsetarget.torch` sets the core to 1 BLAS
thread, unless the thread count was chosen: ``OPENBLAS_NUM_THREADS`` in the environment, or an explicit
:func:`sparsetarget.set_num_threads` call (before or after the import), which always wins.
"""

from __future__ import annotations

import os

from . import _core

_chosen = False


def mark_chosen() -> None:
    """Record that the user set the BLAS thread count (``sparsetarget.set_num_threads``)."""
    global _chosen
    _chosen = True


def default_for_torch() -> int:
    """One BLAS thread for the core unless the count was chosen (see the module notes); returns the count."""
    if not _chosen and "OPENBLAS_NUM_THREADS" not in os.environ:
        _core.set_num_threads(1)
    return int(_core.get_num_threads())
