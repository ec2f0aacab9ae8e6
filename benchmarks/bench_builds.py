"""Compare two builds of sparsetarget side by side: the same training steps, interleaved, in one run.

Run:  python benchmarks/bench_builds.py --old /path/to/old/venv/bin/python [--new python] [--rounds 7]

Each build runs in its own worker process per shape (layer and batches built once, from the same seeds); the
driver then alternates short timing bursts between the two workers, so that load from other processes on the
machine falls on both alike, and reports the median step time of each build and their ratio. Before timing, both
workers take the same three steps at a small size and must agree on the resulting weights (a correctness check
across builds). 1 BLAS thread, float32 weights and state, spherical softmax, the README's shapes; the NumPy step
(``FactoredOutput.step``) and the torch training step (forward, loss, backward, ``FactoredSGD.step``).
Writes benchmarks/results/builds_<host>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _machine import machine_info, write_results

SHAPES = [(793_471, 512, 200), (200_000, 512, 128), (100_000, 256, 128), (793_471, 512, 1)]
APIS = ("numpy", "torch")


# ---------------------------------------------------------------------------------------------- worker side
def worker(api: str, D: int, d: int, m: int) -> None:
    """Build one layer, then answer 'check' and 'time SECONDS' lines on stdin with one JSON line each."""
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    import numpy as np
    import sparsetarget as st

    st.set_num_threads(1)
    rng = np.random.default_rng(0)
    batches = [((rng.standard_normal((m, d)) / np.sqrt(d)).astype(np.float32), rng.integers(0, D, m))
               for _ in range(16)]
    if api == "numpy":
        layer = st.FactoredOutput.random(D, d, loss="spherical_softmax", seed=1)

        def step(i: int) -> None:
            H, y = batches[i % len(batches)]
            layer.step(H, y, 0.05)
    else:
        import sparsetarget.torch as stt
        import torch

        torch.set_num_threads(1)
        torch.manual_seed(1)
        head = stt.FactoredLinear(d, D)
        opt = stt.FactoredSGD(head, lr=0.05)
        tb = [(torch.from_numpy(H).requires_grad_(), torch.from_numpy(y)) for H, y in batches]

        def step(i: int) -> None:
            h, y = tb[i % len(tb)]
            opt.zero_grad()
            stt.linear_spherical_loss(h, head, y, loss="spherical_softmax").backward()
            opt.step()

    print(json.dumps({"ready": True}), flush=True)
    done = 0
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "check":  # three steps at a small size from fixed weights: the builds must agree
            rng_c = np.random.default_rng(7)
            small = st.FactoredOutput(rng_c.uniform(-0.1, 0.1, (997, 61)), loss="spherical_softmax")
            for _ in range(3):
                small.step(rng_c.standard_normal((9, 61)), rng_c.integers(0, 997, 9), 0.3)
            W = small.dense_weight() if hasattr(small, "dense_weight") else small.weight()
            print(json.dumps({"checksum": float(np.abs(W).sum()), "first": float(W[0, 0])}), flush=True)
        elif cmd[0] == "time":
            times = []
            stop = time.perf_counter() + float(cmd[1])
            while time.perf_counter() < stop or len(times) < 3:
                t0 = time.perf_counter()
                step(done)
                times.append(time.perf_counter() - t0)
                done += 1
            print(json.dumps({"median_ms": 1e3 * statistics.median(times), "n": len(times)}), flush=True)


# ---------------------------------------------------------------------------------------------- driver side
class Worker:
    def __init__(self, python: str, api: str, shape: tuple[int, int, int]) -> None:
        args = [python, os.path.abspath(__file__), "--worker", api, *map(str, shape)]
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd="/")  # outside any source tree: each interpreter imports its own build
        self.ask(None)

    def ask(self, command: str | None) -> dict:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args} exited")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="Python interpreter with the old build installed")
    ap.add_argument("--new", default=sys.executable, help="Python interpreter with the new build (default: this one)")
    ap.add_argument("--rounds", type=int, default=7, help="timing bursts per build and shape, interleaved")
    ap.add_argument("--burst", type=float, default=1.0, help="seconds per burst")
    ap.add_argument("--apis", default=",".join(APIS), help="numpy,torch")
    ap.add_argument("--shapes", default=None, help="D,d,m;D,d,m;... (default: the README's four)")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args()

    rows = []
    print(f"{'api':6} {'(D, d, m)':>20} {'old ms':>9} {'new ms':>9} {'new/old':>8}  (median of {args.rounds} "
          f"interleaved bursts of {args.burst} s, 1 thread)")
    shapes = SHAPES if args.shapes is None else [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    for api in args.apis.split(","):
        for shape in shapes:
            old, new = Worker(args.old, api, shape), Worker(args.new, api, shape)
            try:
                a, b = old.ask("check"), new.ask("check")
                if abs(a["checksum"] - b["checksum"]) > 1e-9 * abs(a["checksum"]):
                    raise SystemExit(f"the builds disagree on three small steps: {a} vs {b}")
                t_old, t_new = [], []
                for r in range(args.rounds):
                    pair = (old, t_old), (new, t_new)
                    for w, acc in (pair if r % 2 == 0 else pair[::-1]):  # alternate who goes first
                        acc.append(w.ask(f"time {args.burst}")["median_ms"])
            finally:
                old.close()
                new.close()
            mo, mn = statistics.median(t_old), statistics.median(t_new)
            rows.append({"api": api, "shape": shape, "old_ms": mo, "new_ms": mn, "ratio": mn / mo,
                         "old_bursts": t_old, "new_bursts": t_new})
            print(f"{api:6} {str(shape):>20} {mo:9.3f} {mn:9.3f} {mn / mo:8.3f}", flush=True)

    out = write_results("builds", {"machine": machine_info(), "rounds": args.rounds, "burst_s": args.burst,
                                   "rows": rows}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], *map(int, sys.argv[3:6]))
    else:
        main()
