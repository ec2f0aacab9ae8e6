"""What the stabilisation band costs in accuracy: squared-error training, the loss that spreads U's singular values
fastest (alpha = 2 for every example), with several ``sigma_range`` values and both state dtypes, against a dense
float64 replay of the same SGD (materialised W), next to dense float32 SGD on the same batches.

A wider band means rarer corrections (passes over V) but a larger condition of U between them, which amplifies the
rounding of every float32 V update. For each (state dtype, band) it reports the corrections and moved values, the
largest condition of U seen (exact SVD every ``--every`` steps), and ||W - W_dense64||_F / ||W_dense64||_F at the end,
also as a multiple of dense float32 SGD's own error.

Run:  python benchmarks/band_accuracy.py [--D 20000] [--d 128] [--m 64] [--lr 0.05] [--steps 1000]
Writes benchmarks/results/band_accuracy.json and .txt.
"""

from __future__ import annotations

import argparse
import os

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--D", type=int, default=20000)
ap.add_argument("--d", type=int, default=128)
ap.add_argument("--m", type=int, default=64)
ap.add_argument("--lr", type=float, default=0.05)
ap.add_argument("--weight-decay", type=float, default=1e-4)
ap.add_argument("--steps", type=int, default=1000)
ap.add_argument("--every", type=int, default=25, help="exact condition of U every this many steps")
ap.add_argument("--bands", default="0.5:2,0.25:4,0.2:5,0.1:10,0.01:100")
ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "band_accuracy"))
args = ap.parse_args()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import sparsetarget as st  # noqa: E402
from _machine import machine_info, write_results  # noqa: E402


def batches(seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(args.steps):
        H = rng.standard_normal((args.m, args.d))
        H /= np.linalg.norm(H, axis=1, keepdims=True)
        yield H, np.minimum(rng.zipf(1.2, args.m) - 1, args.D - 1)


def dense_run(W0: np.ndarray, dtype: type) -> np.ndarray:
    """Plain dense SGD on the summed squared error ||o - e_y||^2, in ``dtype``."""
    W = W0.astype(dtype)
    c, lr, rows = dtype(1 - args.lr * args.weight_decay), dtype(args.lr), np.arange(args.m)
    for H, y in batches(1):
        Hc = H.astype(dtype)
        G = 2 * (Hc @ W.T)
        G[rows, y] -= 2
        W = c * W - lr * (G.T @ Hc)
    return W.astype(np.float64)


def factored_run(W0: np.ndarray, state_dtype: str, band: tuple[float, float] | None) -> dict:
    layer = st.FactoredOutput(W0.astype(np.float32), loss="squared_error", state_dtype=state_dtype,
                              sigma_range=band)
    conds = []
    for t, (H, y) in enumerate(batches(1), 1):
        layer.step(H.astype(np.float32), y, args.lr, args.weight_decay)
        if t % args.every == 0:
            sv = np.linalg.svd(layer.state_dict()["U"].astype(np.float64), compute_uv=False)
            conds.append(sv[0] / sv[-1])
    diag = layer.diagnostics()
    return {"W": layer.dense_weight().astype(np.float64), "corrections": int(diag["corrections"]),
            "moved_values": int(diag["corrected_values"]), "max_condition": float(max(conds)),
            "median_condition": float(np.median(conds)), "sigma_range": list(layer.config()["sigma_range"])}


def main() -> None:
    W0 = np.random.default_rng(0).standard_normal((args.D, args.d)).astype(np.float32) / np.sqrt(args.d)
    W64 = dense_run(W0, np.float64)
    norm = np.linalg.norm(W64)
    err32 = float(np.linalg.norm(dense_run(W0, np.float32) - W64) / norm)
    bands = [tuple(float(x) for x in b.split(":")) for b in args.bands.split(",")]
    rows = []
    head = (f"band accuracy: squared error, D={args.D} d={args.d} m={args.m} lr={args.lr} "
            f"wd={args.weight_decay} steps={args.steps}, |h| = 1, float32 weights; {machine_info()['cpu']}\n"
            f"dense float32 SGD: error {err32:.2e} against dense float64\n"
            f"{'state':>7} {'sigma_range':>14} {'default':>7} {'corr':>5} {'moved':>6} {'max cond':>9} "
            f"{'med cond':>9} {'error':>9} {'x dense32':>9}")
    lines = [head]
    print(head, flush=True)
    for state_dtype in ("float32", "float64"):
        default = st._engine.default_sigma_range(state_dtype)
        for band in bands:
            r = factored_run(W0, state_dtype, band)
            r.update(state_dtype=state_dtype, default=band == default,
                     error=float(np.linalg.norm(r.pop("W") - W64) / norm))
            r["error_over_dense32"] = r["error"] / err32
            rows.append(r)
            line = (f"{state_dtype:>7} {str(band):>14} {'yes' if r['default'] else '':>7} {r['corrections']:>5} "
                    f"{r['moved_values']:>6} {r['max_condition']:>9.1f} {r['median_condition']:>9.1f} "
                    f"{r['error']:>9.2e} {r['error_over_dense32']:>9.1f}")
            lines.append(line)
            print(line, flush=True)
    lines.append("error: ||W - W_dense64||_F / ||W_dense64||_F after the run; x dense32: that error over dense float32 "
                 "SGD's; max/med cond: condition of U (exact SVD every "
                 f"{args.every} steps); default: the band a layer of that state dtype gets unless told")
    path = write_results("band_accuracy", {"info": machine_info(), "args": vars(args), "dense_float32_error": err32,
                                           "runs": rows}, args.out + ".json")
    with open(args.out + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"saved {path} and {args.out}.txt")


if __name__ == "__main__":
    main()
