"""The core's own loops for products with a short side against the vendor BLAS, at the step's product shapes.

Run:  python benchmarks/bench_small_gemm.py [--d 512] [--rounds 15]
      OPENBLAS_CORETYPE=SkylakeX python benchmarks/bench_small_gemm.py    (another OpenBLAS kernel)

The step's m x d x d products (H Q, Zv U, H U^-1: "NN"; H U^T: "NT"), its rank-m updates of the d x d state
(U, U^-1: "TN") and the Q update's SYR2K, each timed single-threaded by the vendor BLAS (OpenBLAS, with the kernel
it chose or OPENBLAS_CORETYPE forced) and by the core's own loops (``sparsetarget._core._product``), in alternating
bursts; medians. Both results are first checked against float64 NumPy. The table says where the own loops win: the
core routes a product to them only where they beat the vendor's best kernel on this machine (the limits are in
csrc/cpu/small_gemm_cpu.cpp). Writes benchmarks/results/small_gemm_<core>_<host>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import sparsetarget as st  # noqa: E402
from _machine import machine_info, write_results  # noqa: E402
from sparsetarget import _core  # noqa: E402


def operands(kind: str, m: int, d: int, dtype, rng) -> tuple:
    """(call, flops) of one product of the step's kind at m rows, d hidden units."""
    h = rng.standard_normal((m, d)).astype(dtype)
    big = rng.standard_normal((d, d)).astype(dtype)
    if kind == "SYR2K":
        b = rng.standard_normal((m, d)).astype(dtype)
        c = (big + big.T).astype(dtype)
        return (lambda route: _core._sym_rank2k(h, b, c, -1e-3, 1.0, route)), 2.0 * m * d * d, (h, b, c)
    if kind == "TN":  # d x d <- d x d + (m x d)^T (m x d)
        b = rng.standard_normal((m, d)).astype(dtype)
        return (lambda route: _core._product(h, b, big, True, False, -1e-3, 1.0, route)), 2.0 * m * d * d, (h, b, big)
    out = np.zeros((m, d), dtype)
    return (lambda route: _core._product(h, big, out, False, kind == "NT", 1.0, 0.0, route)), 2.0 * m * d * d, \
        (h, big, out)


def check(kind: str, m: int, d: int, dtype) -> float:
    """Largest relative difference of either route from float64 NumPy on one product."""
    rng = np.random.default_rng(m)
    worst = 0.0
    for route in ("vendor", "own"):
        call, _, (a, b, c) = operands(kind, m, d, dtype, rng)
        a64, b64, c64 = a.astype(np.float64), b.astype(np.float64), c.astype(np.float64)
        call(route)
        if kind == "SYR2K":
            want = c64 - 1e-3 * (a64.T @ b64 + b64.T @ a64)
        elif kind == "TN":
            want = c64 - 1e-3 * a64.T @ b64
        else:
            want = a64 @ (b64.T if kind == "NT" else b64)
        worst = max(worst, float(np.abs(c - want).max() / np.abs(want).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32, 64, 128, 200])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--burst", type=float, default=0.05, help="seconds per burst")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    st.set_num_threads(1)
    core = st.build_info()["blas_kernel"]  # the OpenBLAS that the core, and its vendor route, link
    info = machine_info(openblas_core=core, small_gemm=st.build_info()["small_gemm"], d=args.d, rounds=args.rounds)
    print(f"# {info['cpu']}, {info['cpus']} cpus; OpenBLAS kernel {core}; own loops: {info['small_gemm']}; "
          f"1 thread, d = {args.d}, medians of {args.rounds} alternating bursts")
    print(f"{'dtype':>7} {'product':>7} {'m':>4} {'vendor us':>10} {'GF/s':>6} {'own us':>9} {'GF/s':>6} "
          f"{'vendor/own':>10} {'check':>8}")
    rows = []
    for dtype in (np.float32, np.float64):
        for kind in ("NN", "NT", "TN", "SYR2K"):
            for m in args.rows:
                err = check(kind, m, args.d, dtype)
                assert err < (1e-4 if dtype == np.float32 else 1e-12), (kind, m, err)
                call, flops, _ = operands(kind, m, args.d, dtype, np.random.default_rng(0))
                times: dict[str, list[float]] = {"vendor": [], "own": []}
                for _ in range(args.rounds):
                    for route in times:
                        n, t0 = 0, time.perf_counter()
                        while True:
                            call(route)
                            n += 1
                            if time.perf_counter() - t0 > args.burst:
                                break
                        times[route].append((time.perf_counter() - t0) / n)
                v, o = statistics.median(times["vendor"]), statistics.median(times["own"])
                name = np.dtype(dtype).name
                print(f"{name:>7} {kind:>7} {m:>4} {v * 1e6:>10.1f} {flops / v / 1e9:>6.0f} {o * 1e6:>9.1f} "
                      f"{flops / o / 1e9:>6.0f} {v / o:>9.2f}x {err:>8.1e}")
                rows.append({"dtype": name, "product": kind, "m": m, "d": args.d, "vendor_us": v * 1e6,
                             "own_us": o * 1e6, "vendor_over_own": v / o, "check_rel_err": err,
                             "vendor_bursts_us": [t * 1e6 for t in times["vendor"]],
                             "own_bursts_us": [t * 1e6 for t in times["own"]]})
    path = write_results(f"small_gemm_{core.lower()}", {"machine": info, "rows": rows}, args.out)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
