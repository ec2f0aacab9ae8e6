"""Soak run: long training at D = 100k with each built-in loss and both state dtypes, tracking the drift of the
auxiliary state and the health of the factorisation. Not a test (minutes per configuration).

For every (loss, state dtype) it trains a float32-weight layer on random hidden vectors with Zipf-distributed class
labels, twice: with the default policy (automatic refresh, ``refresh_every=-1``) and with refreshes disabled
(``refresh_every=0``), and every ``--every`` steps reports

- ``Q_err``  = ||Q - W^T W||_F / ||W^T W||_F, ``w_bar_err`` = ||w_bar - W^T 1|| / ||W^T 1|| (W materialised in
  float64 from V, U, omega),
- ``inv_err`` = ||U U^-1 - I||_F, ``cond`` = cond(U), and the counts of corrections and refreshes.

It also times the step (median over the run) and a refresh (median of 5), and reports the share of the run time
that the automatic refreshes cost. Before the soak, each configuration's first steps are checked against a dense
float64 replay (materialised W, plain SGD; squared error and spherical softmax, whose dL/dO are two lines).

Run:  python benchmarks/soak.py [--steps 100000] [--D 100000] [--d 64] [--m 32] [--quick]
Writes benchmarks/results/soak.json and soak.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--steps", type=int, default=100_000)
ap.add_argument("--D", type=int, default=100_000)
ap.add_argument("--d", type=int, default=64)
ap.add_argument("--m", type=int, default=32)
ap.add_argument("--every", type=int, default=0, help="report every this many steps (default steps / 10)")
ap.add_argument("--losses", default="squared_error,spherical_softmax,taylor_softmax,z_loss")
ap.add_argument("--quick", action="store_true", help="D = 5000, 3000 steps: a smoke run")
ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "soak"))
args = ap.parse_args()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import sparsetarget as st  # noqa: E402
from _machine import cpu_model  # noqa: E402

if args.quick:
    args.D, args.steps = 5000, 3000
EVERY = args.every or max(1, args.steps // 10)
LR = {"squared_error": 0.02, "spherical_softmax": 0.5, "taylor_softmax": 0.5, "z_loss": 0.5}


def batch(rng: np.random.Generator, m: int, d: int, D: int) -> tuple[np.ndarray, np.ndarray]:
    H = rng.standard_normal((m, d)) / np.sqrt(d)
    return H.astype(np.float32), (rng.zipf(1.2, m) - 1) % D


def dense_grad(loss: str, O: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dL/dO of the summed loss (squared error with one-hot targets, spherical softmax with eps = 1e-2)."""
    rows = np.arange(O.shape[0])
    if loss == "squared_error":
        dO = 2 * O
        dO[rows, y] -= 2
        return dO
    num = O * O + 1e-2
    dO = 2 * O / num.sum(1, keepdims=True)
    dO[rows, y] -= 2 * O[rows, y] / num[rows, y]
    return dO


def check_against_dense(loss: str, state_dtype: type, rng: np.random.Generator) -> float:
    """Relative error of W after 5 steps against a dense float64 replay (raises if above the dtype's bound)."""
    layer = st.FactoredOutput.random(args.D, args.d, dtype=np.float32, state_dtype=state_dtype, loss=loss, seed=7)
    W = layer.dense_weight().astype(np.float64)
    for _ in range(5):
        H, y = batch(rng, args.m, args.d, args.D)
        layer.step(H, y, LR[loss])
        Hd = H.astype(np.float64)
        W -= LR[loss] * dense_grad(loss, Hd @ W.T, y).T @ Hd
    err = float(np.abs(layer.dense_weight() - W).max() / np.abs(W).max())
    if err > 1e-4:  # float32 weights: rounding of V alone is ~1e-7 per step
        raise SystemExit(f"{loss}/{np.dtype(state_dtype).name}: W off the dense replay by {err:.2e}")
    return err


def health(layer: st.FactoredOutput) -> dict[str, float]:
    sd = layer.state_dict()
    W = sd["V"].astype(np.float64) @ sd["U"].astype(np.float64) + sd["omega"].astype(np.float64)
    WtW, Wt1 = W.T @ W, W.sum(0)
    diag = layer.diagnostics()
    return {
        "Q_err": float(np.linalg.norm(sd["Q"] - WtW) / np.linalg.norm(WtW)),
        "w_bar_err": float(np.linalg.norm(sd["w_bar"] - Wt1) / np.linalg.norm(Wt1)),
        "inv_err": diag["inverse_error"],
        "cond": diag["condition"],
        "corrections": diag["corrections"],
        "refreshes": diag["refreshes"],
    }


def soak(loss: str, state_dtype: type, refresh_every: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    layer = st.FactoredOutput.random(args.D, args.d, dtype=np.float32, state_dtype=state_dtype, loss=loss, seed=seed,
                                     refresh_every=refresh_every)
    trace, step_times, refused = [], [], 0
    for step in range(1, args.steps + 1):
        H, y = batch(rng, args.m, args.d, args.D)
        t0 = time.perf_counter()
        try:
            layer.step(H, y, LR[loss])
        except st.SingularUpdateError:
            refused += 1
        step_times.append(time.perf_counter() - t0)
        if step % EVERY == 0:
            trace.append({"step": step, **health(layer)})
    refresh_times = []
    for _ in range(5):
        t0 = time.perf_counter()
        layer.refresh()
        refresh_times.append(time.perf_counter() - t0)
    step_s = float(np.median(step_times))
    refresh_s = float(np.median(refresh_times))
    n_refresh = trace[-1]["refreshes"]
    return {"loss": loss, "state_dtype": np.dtype(state_dtype).name, "refresh_every": refresh_every,
            "lr": LR[loss], "refused": refused, "step_median_s": step_s, "refresh_median_s": refresh_s,
            "run_s": float(np.sum(step_times)), "refresh_share": n_refresh * refresh_s / float(np.sum(step_times)),
            "trace": trace}


def cpu_name() -> str:
    """The CPU model and core count."""
    return f"{cpu_model()}, {os.cpu_count()} cores"


def main() -> None:
    losses = args.losses.split(",")
    rng = np.random.default_rng(0)
    checks = {f"{loss}/{np.dtype(sdt).name}": check_against_dense(loss, sdt, rng)
              for loss in ("squared_error", "spherical_softmax") for sdt in (np.float32, np.float64)}
    print("dense check (W rel. error after 5 steps):", {k: f"{v:.1e}" for k, v in checks.items()})
    runs = []
    lines = [f"soak: D={args.D} d={args.d} m={args.m} steps={args.steps}, float32 weights, 1 BLAS thread, "
             f"{cpu_name()}",
             f"{'loss':18} {'state':7} {'refresh':>7} {'Q_err':>9} {'max Q_err':>9} {'w_bar_err':>9} {'inv_err':>9} "
             f"{'cond':>6} {'corr':>5} {'refr':>4} {'step ms':>7} {'refr ms':>7} {'refr %':>6}"]
    print(lines[0])
    print(lines[1])
    for loss in losses:
        for sdt in (np.float32, np.float64):
            for refresh_every in (-1, 0):  # interleaved: the default and the old never-refresh side by side
                r = soak(loss, sdt, refresh_every, seed=len(runs) + 1)
                runs.append(r)
                last = r["trace"][-1]
                line = (f"{loss:18} {r['state_dtype']:7} {'auto' if refresh_every < 0 else 'never':>7} "
                        f"{last['Q_err']:9.2e} {max(t['Q_err'] for t in r['trace']):9.2e} {last['w_bar_err']:9.2e} "
                        f"{last['inv_err']:9.2e} {last['cond']:6.2f} {last['corrections']:5d} "
                        f"{last['refreshes']:4d} {1e3 * r['step_median_s']:7.3f} {1e3 * r['refresh_median_s']:7.1f} "
                        f"{100 * r['refresh_share']:6.2f}")
                lines.append(line)
                print(line, flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"config": vars(args), "machine": f"{cpu_name()}; {platform.platform()}", "dense_check": checks,
                   "runs": runs}, f, indent=1)
    period = -(-5 * args.D // args.m)
    lines.append(
        f"Q_err: ||Q - W^T W||_F / ||W^T W||_F at the end and its largest value over {len(r['trace'])} checkpoints; "
        "auto = the default\n"
        f"refresh_every=-1 (every ceil(5 D / m) = {period} steps), never = refresh_every=0; refr % = refreshes x "
        "median refresh\n"
        "time / run time. With float32 V the floor of Q_err is the float32 rounding of V (a refresh accumulates V^T V "
        "in float64\n"
        "from float32 tiles), also with a float64 state. The default sigma_range of each state dtype "
        "(docs/algorithm.md §8.11).")
    with open(args.out + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
