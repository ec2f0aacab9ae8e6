"""Scaling of the CPU step over the core's threads: the same training steps with 1 and with N threads, interleaved.

Run:  python benchmarks/bench_threads.py [--threads 2] [--rounds 7]

One layer per shape (float32 weights and state, spherical softmax); timing bursts alternate between 1 thread and N
threads (``sparsetarget.set_num_threads``) on the same layer and batches; medians of the per-burst medians. Before
timing, three steps at a small size with N threads are checked against dense float64 SGD. Also times one refresh
(the O(D d^2) pass of construction) with 1 and N threads; the first two shapes again while another process keeps
one core busy (a busy loop); and, as the bound to compare with, OpenBLAS's own
scaling of an sgemm of each shape of the step's large products (1 and N OpenBLAS threads, interleaved). Writes
benchmarks/results/threads_<host>.json.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import glob
import itertools
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import sparsetarget as st
from _dense_check import spherical_softmax_steps_error
from _machine import machine_info, write_results

SHAPES = [(793_471, 512, 200), (200_000, 512, 128), (100_000, 256, 128)]


def check(threads: int) -> float:
    """Three steps with ``threads`` threads at a size where the products are split, against dense float64 SGD."""
    st.set_num_threads(threads)
    return spherical_softmax_steps_error(3001, 256, 300, 0.05, h_scale=1 / 16)


def alternating(set_threads: Callable[[int], object], call: Callable[[], object], n: int, rounds: int,
                burst: float) -> dict[int, list[float]]:
    """Median ms of call() in each burst, bursts alternating between 1 and ``n`` threads (set by set_threads)."""
    times: dict[int, list[float]] = {1: [], n: []}
    for r in range(rounds):
        for t in ((1, n) if r % 2 == 0 else (n, 1)):
            set_threads(t)
            calls = []
            stop = time.perf_counter() + burst
            while time.perf_counter() < stop or len(calls) < 3:
                t0 = time.perf_counter()
                call()
                calls.append(time.perf_counter() - t0)
            times[t].append(1e3 * statistics.median(calls))
    return times


def timed_steps(layer: st.FactoredOutput, batches: list, n: int, rounds: int, burst: float) -> dict[int, list[float]]:
    """Median ms per step of each burst, bursts alternating between 1 and ``n`` of the core's threads."""
    turn = itertools.count()

    def step() -> None:
        H, y = batches[next(turn) % len(batches)]
        layer.step(H, y, 0.05)

    return alternating(st.set_num_threads, step, n, rounds, burst)


def sgemm_scaling(n: int, rounds: int, burst: float) -> list[dict]:
    """Median time of OpenBLAS sgemm (m x k times k x n_cols, row-major) with 1 and ``n`` OpenBLAS threads, for the
    shapes of the step's products at (793471, 512, 200): m x d x d (projections, H U^-1) and d x d x m (commit)."""
    import scipy_openblas32

    lib = ctypes.CDLL(glob.glob(os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas*.so"))[0])
    rng = np.random.default_rng(0)
    out = []
    for rows, cols, inner in ((200, 512, 512), (512, 512, 200)):
        a = rng.random((rows, inner), dtype=np.float32)
        b = rng.random((inner, cols), dtype=np.float32)
        c = np.zeros((rows, cols), np.float32)
        args = [ctypes.c_int(x) for x in (101, 111, 111, rows, cols, inner)]
        ptrs = [x.ctypes.data_as(ctypes.c_void_p) for x in (a, b, c)]
        sgemm = functools.partial(lib.scipy_cblas_sgemm, *args, ctypes.c_float(1), ptrs[0], inner, ptrs[1], cols,
                                  ctypes.c_float(0), ptrs[2], cols)
        times = alternating(lib.scipy_openblas_set_num_threads, sgemm, n, rounds, burst)
        lib.scipy_openblas_set_num_threads(1)
        t1, tn = statistics.median(times[1]), statistics.median(times[n])
        out.append({"shape": (rows, cols, inner), "ms_1": t1, f"ms_{n}": tn, "speedup": t1 / tn})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--burst", type=float, default=0.8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n = args.threads
    err = check(n)
    print(f"check: 3 steps with {n} threads vs dense float64 SGD, relative error {err:.1e}")
    print(f"{'(D, d, m)':>20} {'1 thread ms':>12} {f'{n} threads ms':>13} {'speed-up':>9}")
    rows = []
    for D, d, m in SHAPES:
        layer = st.FactoredOutput.random(D, d, loss="spherical_softmax", seed=1)
        rng = np.random.default_rng(0)
        batches = [((rng.standard_normal((m, d)) / np.sqrt(d)).astype(np.float32), rng.integers(0, D, m))
                   for _ in range(8)]
        times = timed_steps(layer, batches, n, args.rounds, args.burst)
        refresh = {}
        for t in (1, n):
            st.set_num_threads(t)
            t0 = time.perf_counter()
            layer.refresh()
            refresh[t] = time.perf_counter() - t0
        t1, tn = statistics.median(times[1]), statistics.median(times[n])
        rows.append({"shape": (D, d, m), "ms_1": t1, f"ms_{n}": tn, "speedup": t1 / tn, "bursts": times,
                     "refresh_s": refresh})
        print(f"{str((D, d, m)):>20} {t1:12.2f} {tn:13.2f} {t1 / tn:8.2f}x   refresh {refresh[1]:.2f} s -> "
              f"{refresh[n]:.2f} s", flush=True)
    busy_rows = []
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # another process keeping a core busy
    try:
        for D, d, m in SHAPES[:2]:
            layer = st.FactoredOutput.random(D, d, loss="spherical_softmax", seed=1)
            rng = np.random.default_rng(0)
            batches = [((rng.standard_normal((m, d)) / np.sqrt(d)).astype(np.float32), rng.integers(0, D, m))
                       for _ in range(8)]
            times = timed_steps(layer, batches, n, args.rounds, args.burst)
            t1, tn = statistics.median(times[1]), statistics.median(times[n])
            busy_rows.append({"shape": (D, d, m), "ms_1": t1, f"ms_{n}": tn, "speedup": t1 / tn})
            print(f"{str((D, d, m)):>20} {t1:12.2f} {tn:13.2f} {t1 / tn:8.2f}x   with a busy process on one core",
                  flush=True)
    finally:
        busy.kill()
    sgemm = sgemm_scaling(n, args.rounds, args.burst / 4)
    for g in sgemm:
        print(f"{'sgemm ' + 'x'.join(map(str, g['shape'])):>20} {g['ms_1']:12.3f} {g[f'ms_{n}']:13.3f} "
              f"{g['speedup']:8.2f}x   (OpenBLAS alone, rows x cols x inner)", flush=True)
    out = write_results("threads", {"machine": machine_info(), "threads": n, "rounds": args.rounds, "check": err,
                                    "rows": rows, "busy": busy_rows, "sgemm": sgemm}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
