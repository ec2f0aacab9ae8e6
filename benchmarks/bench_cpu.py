"""CPU benchmark: factored step vs dense SGD step, time vs D, peak memory, amortised stabilisation.

Run:  python benchmarks/bench_cpu.py [--threads 1] [--quick]
Prints tables and writes benchmarks/results/cpu_<host>.json and cpu_<host>.png (if matplotlib is installed).
Every configuration is checked against the dense layer before it is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import time

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--threads", type=int, default=1, help="BLAS threads for both factored and dense (default 1)")
ap.add_argument("--quick", action="store_true", help="small sizes only (a smoke run, seconds)")
ap.add_argument("--soak-steps", type=int, default=2000, help="steps of each stabilisation run")
ap.add_argument("--soak-shapes", default=None,
                help="(D, d, m) of the stabilisation runs, e.g. 200000:512:128,793471:512:200 (default: those two)")
ap.add_argument("--sections", default="steps,sweep,soak",
                help="comma-separated: steps (the step table), sweep (time vs D), soak (stabilisation runs); "
                     "a run without every section writes cpu_<sections>_<threads>thread.json")
ap.add_argument("--out", default=None, help="JSON output path")
args = ap.parse_args()
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(args.threads)

import numpy as np  # noqa: E402
import sparsetarget as st  # noqa: E402
from _machine import machine_info  # noqa: E402
from _memory import reset_peak, rss_mib  # noqa: E402

st.set_num_threads(args.threads)
LR = 0.05
EPS = 1e-2


def batch(rng, m, d, D):
    H = (rng.standard_normal((m, d)) / np.sqrt(d)).astype(np.float32)
    return H, rng.integers(0, D, m)


def dense_step(W, H, y, lr):
    """One dense float32 SGD step of the spherical softmax loss: O(m D d)."""
    O = H @ W.T
    num = O * O + EPS
    Z = num.sum(1, keepdims=True)
    m = H.shape[0]
    loss = np.log(Z[:, 0]) - np.log(num[np.arange(m), y])
    dO = 2 * O / Z
    dO[np.arange(m), y] -= 2 * O[np.arange(m), y] / num[np.arange(m), y]
    grad_H = dO @ W
    W -= lr * (dO.T @ H)
    return loss, grad_H


def time_calls(fn, min_reps, min_seconds):
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 400:
            break
    return float(np.median(times)) * 1e3, len(times)


def bench_config(D, d, m, rng, dense=True):
    row = {"D": D, "d": d, "m": m}
    layer = st.FactoredOutput.random(D, d, dtype=np.float32, seed=0, loss="spherical_softmax", eps=EPS)
    H, y = batch(rng, m, d, D)
    W = layer.dense_weight()
    # correctness first: the factored loss and grad_H against the dense layer at the same W
    L_f, g_f = layer.step(H, y, LR)
    L_d, g_d = dense_step(W.copy(), H, y, LR)
    row["check_rel_err_grad_H"] = float(np.abs(g_f - g_d).max() / np.abs(g_d).max())
    assert row["check_rel_err_grad_H"] < 1e-3, row
    for sdt in (np.float32, np.float64):
        lay = layer if sdt == np.float32 else st.FactoredOutput.random(D, d, dtype=np.float32, seed=0,
                                                                        state_dtype=sdt, loss="spherical_softmax")
        batches = [batch(rng, m, d, D) for _ in range(16)]
        it = iter(range(10**9))
        lay.step(*batches[0], LR)
        reset_peak()
        base = rss_mib("VmRSS")
        ms, n = time_calls(lambda lay=lay, batches=batches, it=it: lay.step(*batches[next(it) % 16], LR), 10, 1.5)
        row[f"factored_ms_state_{np.dtype(sdt)}"] = ms
        row[f"factored_reps_state_{np.dtype(sdt)}"] = n
        row[f"factored_peak_extra_mib_state_{np.dtype(sdt)}"] = rss_mib("VmHWM") - base
        del lay
    row["V_mib"] = D * d * 4 / 2**20
    if dense:
        reset_peak()
        base = rss_mib("VmRSS")
        reps = 2 if D * m > 5e7 else 5
        ms, _ = time_calls(lambda: dense_step(W, H, y, LR), reps, 0.0)
        row["dense_ms"] = ms
        row["dense_peak_extra_mib"] = rss_mib("VmHWM") - base
        row["speedup_f32_state"] = ms / row["factored_ms_state_float32"]
        row["speedup_target_D_over_4d"] = D / (4 * d)
    return row


def soak(D, d, m, steps, loss, lr, weight_decay, state_dtype, sigma_range, rng):
    """``steps`` steps of |h| = 1 rows: the median step, and the time the steps that corrected U took beyond it."""
    layer = st.FactoredOutput.random(D, d, dtype=np.float32, seed=1, loss=loss, state_dtype=state_dtype,
                                     sigma_range=sigma_range)
    times, corrected = [], []
    for _ in range(steps):
        H = rng.standard_normal((m, d)).astype(np.float32)
        H /= np.linalg.norm(H, axis=1, keepdims=True)  # |h| = 1
        y = np.minimum(rng.zipf(1.2, m) - 1, D - 1)
        c0 = layer._engine.arrays["stats"][int(st._engine.Stat.corrections)]
        t0 = time.perf_counter()
        layer.step(H, y, lr, weight_decay)
        times.append(time.perf_counter() - t0)
        corrected.append(layer._engine.arrays["stats"][int(st._engine.Stat.corrections)] > c0)
    times = np.array(times) * 1e3
    corrected = np.array(corrected)
    typical = float(np.median(times[~corrected])) if (~corrected).any() else float("nan")
    diag = layer.diagnostics()
    sd = layer.state_dict()
    rows = rng.integers(0, D, 64)
    W = layer.dense_weight()
    exact = sd["V"][rows].astype(np.float64) @ sd["U"].astype(np.float64) + sd["omega"]
    return {
        "D": D, "d": d, "m": m, "steps": steps, "loss": loss, "lr": lr, "weight_decay": weight_decay,
        "state_dtype": state_dtype, "sigma_range": list(layer.config()["sigma_range"]),
        "default_sigma_range": sigma_range is None,
        "median_step_ms": typical,
        "total_s": float(times.sum() / 1e3),
        "corrections": int(diag["corrections"]),
        "corrected_values": int(diag["corrected_values"]),
        "correction_step_ms": [float(t) for t in times[corrected]],
        "amortised_stabilisation_ms_per_step": (
            float((times[corrected] - typical).sum() / steps) if corrected.any() else 0.0),
        "mean_step_ms": float(times.mean()),
        "final_condition": diag["condition"],
        "final_inverse_error": diag["inverse_error"],
        "W_rows_consistency": float(np.abs(W[rows] - exact).max() / np.abs(exact).max()),
    }


def main() -> None:
    rng = np.random.default_rng(0)
    info = machine_info(threads=args.threads, numpy=np.__version__, build=st.build_info(),
                        date=time.strftime("%Y-%m-%d"))
    if args.quick:
        configs = [(20000, 128, 64), (20000, 128, 1)]
        sweep_D, sweep = [5000, 20000, 50000], (128, 64)
        soak_cfgs = [(20000, 128, 64)]
    else:
        configs = [(793471, 512, 200), (200000, 512, 128), (100000, 256, 128), (793471, 512, 1)]
        sweep_D, sweep = [12500, 25000, 50000, 100000, 200000, 400000, 793471], (256, 128)
        soak_cfgs = [(200000, 512, 128), (793471, 512, 200)]
    if args.soak_shapes:
        soak_cfgs = [tuple(int(x) for x in shape.split(":")) for shape in args.soak_shapes.split(",")]
    sections = set(args.sections.split(","))
    results = {"info": info, "configs": [], "sweep_D": [], "soak": []}
    print(f"# sparsetarget CPU benchmark, {info['cpu']}, {args.threads} BLAS thread(s), float32 weights\n")
    if "steps" in sections:
        print(f"{'D':>8} {'d':>4} {'m':>4} | {'factored ms':>11} {'(f64 state)':>11} | {'dense ms':>9} | "
              f"{'speed-up':>8} {'D/4d':>6} | {'extra MiB':>9} {'dense MiB':>9}")
        for D, d, m in configs:
            r = bench_config(D, d, m, rng)
            results["configs"].append(r)
            f32, f64 = r["factored_ms_state_float32"], r["factored_ms_state_float64"]
            print(f"{D:>8} {d:>4} {m:>4} | {f32:>11.3f} {f64:>11.3f} | "
                  f"{r['dense_ms']:>9.1f} | {r['speedup_f32_state']:>8.0f} {r['speedup_target_D_over_4d']:>6.0f} | "
                  f"{r['factored_peak_extra_mib_state_float32']:>9.1f} {r['dense_peak_extra_mib']:>9.1f}", flush=True)
    d, m = sweep
    if "sweep" in sections:
        print(f"\n# time vs D at d={d}, m={m} (factored, float32 state)")
        for D in sweep_D:
            r = bench_config(D, d, m, rng, dense=D <= 100000)
            results["sweep_D"].append(r)
            extra = f"  dense {r['dense_ms']:.1f} ms" if "dense_ms" in r else ""
            print(f"D={D:>8}: {r['factored_ms_state_float32']:.3f} ms{extra}", flush=True)
    if "soak" in sections:
        print(f"\n# stabilisation over {args.soak_steps} steps, |h| = 1, float32 weights; amortised = time of the "
              "correcting steps beyond the median, per step")
        print(f"{'(D, d, m)':>18} {'loss':>17} {'lr':>5} {'state':>7} {'sigma_range':>12} | {'median ms':>9} "
              f"{'corr':>4} {'values':>6} {'amortised ms':>12} {'share':>6} {'cond':>6}")
        # the default band of each state dtype (None), and the narrow band (0.5, 2) beside it for squared error
        runs = [("spherical_softmax", 0.1, None), ("squared_error", 0.01, None), ("squared_error", 0.01, (0.5, 2.0))]
        for cfg in soak_cfgs:
            for state_dtype in ("float32", "float64"):
                for loss, lr, band in runs:
                    if band is not None and state_dtype == "float64":
                        continue
                    r = soak(*cfg, args.soak_steps, loss, lr, 1e-4, state_dtype, band, rng)
                    r["amortised_share"] = r["amortised_stabilisation_ms_per_step"] / r["median_step_ms"]
                    results["soak"].append(r)
                    print(f"{str(cfg):>18} {loss:>17} {lr:>5} {state_dtype:>7} "
                          f"{str(tuple(r['sigma_range'])) + ('' if band else '*'):>12} | "
                          f"{r['median_step_ms']:>9.2f} {r['corrections']:>4} {r['corrected_values']:>6} "
                          f"{r['amortised_stabilisation_ms_per_step']:>12.3f} {100 * r['amortised_share']:>5.1f}% "
                          f"{r['final_condition']:>6.1f}", flush=True)
        print("* the default band of the state dtype")
    name = "" if sections == {"steps", "sweep", "soak"} else "_".join(sorted(sections)) + "_"
    if args.soak_steps != 2000:
        name += f"{args.soak_steps}steps_"
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"cpu_{'quick_' if args.quick else ''}{name}{args.threads}thread.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nsaved {out}")
    if "sweep" not in sections:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    Ds = [r["D"] for r in results["sweep_D"]]
    ax.loglog(Ds, [r["factored_ms_state_float32"] for r in results["sweep_D"]], "o-", label="factored (float32 state)")
    ax.loglog(Ds, [r["factored_ms_state_float64"] for r in results["sweep_D"]], "s-", label="factored (float64 state)")
    dense = [(r["D"], r["dense_ms"]) for r in results["sweep_D"] if "dense_ms" in r]
    ax.loglog([x for x, _ in dense], [t for _, t in dense], "^-", label="dense SGD (BLAS)")
    ax.set_xlabel("D (outputs)")
    ax.set_ylabel("ms per step")
    ax.set_title(f"d={d}, m={m}, {args.threads} thread(s)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.replace(".json", ".png"), dpi=120)
    print(f"saved {out.replace('.json', '.png')}")


if __name__ == "__main__":
    main()
