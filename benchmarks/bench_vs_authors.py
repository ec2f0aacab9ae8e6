"""The CPU step against the original authors' implementation, through machine-independent ratios.

Run:  python benchmarks/bench_vs_authors.py [--old /path/to/old/venv/bin/python] [--rounds 7]

The authors' C++ (``batch_fbpropupdate``, Woodbury path) is not part of this repository. It was timed once, side by
side with sparsetarget 0.2.0 in one process (same batches, same OpenBLAS, 1 thread, float32, on a 2-core AMD EPYC
VM); this script carries those measurements to any machine in two ways:

- as a fraction of the single-core sgemm peak (2048^3) on their FLOP count, 18 d^2 m + 10 m^2 d + 2 m^3: the
  authors ran at 76 %, 73 % and 75 % of it at the three large shapes; the modelled authors' time here is
  their FLOPs / (that fraction x the sgemm peak measured in this run);
- as a ratio to sparsetarget 0.2.0 (``--old``, a Python with that build installed, timed in this run): the
  authors' time was 0.98, 1.00, 0.88 and 1.06 times 0.2.0's at the four README shapes and 0.86-0.97 times at
  m = 8...64; the most demanding end (0.86) is used there.

Before timing, the new build's step is checked against a dense float64 SGD step at a small size (and, with
``--old``, against the old build's weights after three steps). Then, per shape, timing bursts of the sgemm peak,
the new build and the old build alternate; medians are reported. 1 BLAS thread, float32 weights and state,
spherical softmax. Writes benchmarks/results/vs_authors_<host>.json and prints the table.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import statistics
import sys
import time

os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from _dense_check import spherical_softmax_steps_error  # noqa: E402
from _machine import machine_info, write_results  # noqa: E402
from bench_builds import Worker  # noqa: E402

# (D, d, m): authors' % of the sgemm peak (None: not measured) and authors' time / sparsetarget 0.2.0's time.
AUTHORS = {
    (793_471, 512, 200): (0.76, 0.98),
    (200_000, 512, 128): (0.73, 1.00),
    (100_000, 256, 128): (0.75, 0.88),
    (793_471, 512, 1): (None, 1.06),
    (200_000, 512, 8): (None, 0.86),
    (200_000, 512, 32): (None, 0.86),
    (200_000, 512, 64): (None, 0.86),
}


def our_flops(d: int, m: int) -> float:
    """FLOPs of our step: 14 d^2 m + 8 m^2 d + 2 m^3 (Woodbury, m < d; the symmetric m x m products count one
    triangle; docs/algorithm.md §5.14)."""
    return 14.0 * d * d * m + 8.0 * m * m * d + 2.0 * m**3


def their_flops(d: int, m: int) -> float:
    return 18.0 * d * d * m + 10.0 * m * m * d + 2.0 * m**3


class Sgemm:
    """Single-threaded sgemm 2048^3 through the OpenBLAS that sparsetarget links (scipy-openblas32)."""

    N = 2048

    def __init__(self) -> None:
        import scipy_openblas32

        path = glob.glob(os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas*.so"))[0]
        self.lib = ctypes.CDLL(path)
        self.lib.scipy_openblas_set_num_threads(1)
        rng = np.random.default_rng(0)
        self.a = rng.random((self.N, self.N), dtype=np.float32)
        self.b = rng.random((self.N, self.N), dtype=np.float32)
        self.c = np.zeros((self.N, self.N), np.float32)
        self.core = "?"
        if hasattr(self.lib, "scipy_openblas_get_corename"):
            self.lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
            self.core = self.lib.scipy_openblas_get_corename().decode()

    def burst(self, seconds: float) -> float:
        """GFLOP/s, median over the calls of one burst."""
        ptr = lambda x: x.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
        f = ctypes.c_float
        rates = []
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop or len(rates) < 2:
            t0 = time.perf_counter()
            self.lib.scipy_cblas_sgemm(101, 111, 111, self.N, self.N, self.N, f(1), ptr(self.a), self.N, ptr(self.b),
                                       self.N, f(0), ptr(self.c), self.N)
            rates.append(2.0 * self.N**3 / (time.perf_counter() - t0) / 1e9)
        return statistics.median(rates)


def check_against_dense() -> float:
    """Three steps of the new build at a small size against dense float64 SGD; returns the relative error."""
    return spherical_softmax_steps_error(997, 61, 9, 0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default=None, help="Python with sparsetarget 0.2.0 installed (the second carrier)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing bursts per shape")
    ap.add_argument("--burst", type=float, default=0.6, help="seconds per burst")
    ap.add_argument("--shapes", default=None, help="D,d,m;... (default: all shapes with authors' figures)")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args()

    dense_err = check_against_dense()
    sgemm = Sgemm()
    shapes = list(AUTHORS) if args.shapes is None else [tuple(int(x) for x in s.split(",")) for s in
                                                         args.shapes.split(";")]
    print(f"check: 3 steps vs dense float64 SGD, relative error {dense_err:.1e}; OpenBLAS core {sgemm.core}, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    head = (f"{'(D, d, m)':>19} {'ours ms':>8} {'% peak':>7} {'peak GF/s':>9} {'0.2.0 ms':>9} "
            f"{'authors ms (peak)':>17} {'(0.2.0)':>8} {'speed-up':>9}")
    print(head, flush=True)
    rows = []
    for shape in shapes:
        D, d, m = shape
        new = Worker(sys.executable, "numpy", shape)
        old = Worker(args.old, "numpy", shape) if args.old else None
        try:
            if old is not None:
                a, b = old.ask("check"), new.ask("check")
                if abs(a["checksum"] - b["checksum"]) > 1e-9 * abs(a["checksum"]):
                    raise SystemExit(f"the builds disagree on three small steps: {a} vs {b}")
            t_new, t_old, peaks, fractions = [], [], [], []
            for r in range(args.rounds):
                order = ["sgemm", "new", "old"] if r % 2 == 0 else ["old", "new", "sgemm"]
                for who in order:
                    if who == "sgemm":
                        peaks.append(sgemm.burst(args.burst))
                    elif who == "new":
                        t_new.append(new.ask(f"time {args.burst}")["median_ms"])
                    elif old is not None:
                        t_old.append(old.ask(f"time {args.burst}")["median_ms"])
                fractions.append(our_flops(d, m) / (t_new[-1] * 1e-3) / 1e9 / peaks[-1])
        finally:
            new.close()
            if old is not None:
                old.close()
        tn, peak = statistics.median(t_new), statistics.median(peaks)
        to = statistics.median(t_old) if t_old else None
        pct_auth, ratio_old = AUTHORS.get(shape, (None, None))
        auth_peak = 1e3 * their_flops(d, m) / (pct_auth * peak * 1e9) if pct_auth else None
        auth_old = ratio_old * to if (ratio_old and to) else None
        candidates = [t for t in (auth_peak, auth_old) if t is not None]
        speedup = min(candidates) / tn if candidates else None
        row = {"shape": shape, "ours_ms": tn, "ours_fraction_of_peak": statistics.median(fractions),
               "sgemm_peak_gflops": peak, "old_ms": to, "authors_ms_from_peak": auth_peak,
               "authors_ms_from_old": auth_old, "speedup_vs_authors": speedup,
               "ours_bursts_ms": t_new, "old_bursts_ms": t_old, "peak_bursts_gflops": peaks}
        rows.append(row)
        fmt = lambda x, w, p: f"{x:{w}.{p}f}" if x is not None else f"{'-':>{w}}"  # noqa: E731
        print(f"{str(shape):>19} {tn:8.3f} {100 * row['ours_fraction_of_peak']:6.0f}% {peak:9.1f} {fmt(to, 9, 3)} "
              f"{fmt(auth_peak, 17, 3)} {fmt(auth_old, 8, 3)} {fmt(speedup, 8, 2)}x", flush=True)

    out = write_results("vs_authors", {"machine": machine_info(openblas_core=sgemm.core), "rounds": args.rounds,
                                       "burst_s": args.burst, "dense_check": dense_err, "rows": rows}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
