"""GPU benchmark: one training step of the output layer (forward + loss + backward + update) on a CUDA device.

Compared per step, with the same hidden activations and class targets:
  - factored     FactoredLinear + linear_spherical_loss (spherical softmax) + FactoredSGD, float32 state
  - factored_tf32  the same with torch.backends.cuda.matmul.allow_tf32 = True (the backend's products in TF32)
  - dense        nn.Linear + the same loss written densely + torch.optim.SGD, float32
  - dense_tf32   the same with TF32 matmuls
  - dense_bf16   the same under torch.autocast(bfloat16)
  - lce          torch.nn.functional.linear_cross_entropy (softmax: a different loss, the same job) + SGD, bf16 autocast
  - liger        Liger Kernel's fused linear cross entropy (bf16), where liger_kernel is installed
  - cce          Apple's Cut Cross-Entropy (bf16), where cut_cross_entropy is installed
Reported: median ms/step (CUDA events), speed-up of the factored step, peak GPU memory added by the step (torch's
allocator, plus the backend's own scratch for the factored head), and how close the factored step is to the GPU's
limits: its FLOPs over the GEMM rate measured here, its bytes over the copy bandwidth measured here.
Configurations that do not fit in memory are reported as OOM.

Run:  python benchmarks/bench_gpu.py [--quick] [--out PATH]
Writes benchmarks/results/gpu_<device name>.json and prints a table (redirect it to the .txt beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time

import numpy as np
import sparsetarget as st
import sparsetarget.torch as stt
import torch
import torch.nn.functional as F

LR = 0.05
EPS = 1e-2
SIZES_D = (50_000, 200_000, 793_471, 2_000_000)
SIZES_d = (512, 1024)
SIZES_m = (200, 4096)


def timed(fn, reps: int = 10) -> dict:
    """Median ms of fn() over reps runs after two warm-up runs, and the peak memory it added (MiB)."""
    fn()
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"ms": float(np.median(times)), "reps": reps,
            "peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}


def guarded(fn, reps: int = 10) -> dict:
    try:
        return timed(fn, reps)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"ms": float("nan"), "oom": True}


def gemm_rate(tf32: bool, n: int = 8192) -> float:
    """Measured float32 GEMM rate (FLOP/s) of an n x n product, with or without TF32."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    ms = timed(lambda: a @ b, 10)["ms"]
    torch.backends.cuda.matmul.allow_tf32 = False
    return 2 * n**3 / (ms * 1e-3)


def copy_bandwidth(n_bytes: int = 2 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes/s, read + write)."""
    a = torch.empty(n_bytes // 4, device="cuda")
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a), 10)["ms"]
    return 2 * n_bytes / (ms * 1e-3)


def factored_cost(D: int, d: int, m: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one factored step with class targets (nnz = m), float32, counted from the algorithm:
    the products with the d x d state, the m x m Gram matrix, the solve and the rows of V touched."""
    flops = 2 * m * d * d * 2  # forward: H U^T, H Q
    flops += 2 * m * d * d  # W^T z through U
    flops += 3 * 2 * m * m * d  # the Gram terms o.o and o.z, and B = G H
    flops += 2 * 2 * m * d * d  # syr2k for Q, U update
    if m < d:
        flops += 3 * 2 * m * m * d + 2 * 2 * m * d * d + 2 * m**3  # Woodbury: H H^T, K, [K; H] U^-1, X, solve
    else:
        flops += 2 * m * d * d + 2 * d**3 + 2 * d**3 + 2 * m * d * d  # M, its inverse, M^-1 U^-1, X
    n_bytes = 4 * (4 * m * d  # rows of V: gather, W^T z, scatter (read + write)
                   + 12 * m * d + 4 * m * m + 10 * d * d)  # the m x d, m x m and d x d operands, roughly once each
    return float(flops), float(n_bytes)


def dense_spherical(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    o = o.float()
    num = o.gather(1, y[:, None])[:, 0] ** 2 + EPS
    return -(torch.log(num) - torch.log((o * o).sum(1) + o.shape[1] * EPS)).sum()


def bench_config(D: int, d: int, m: int, rng: np.random.Generator, check: bool) -> dict:
    row: dict = {"D": D, "d": d, "m": m}
    batches = [(torch.from_numpy((rng.standard_normal((m, d)) / np.sqrt(d)).astype(np.float32)).cuda(),
                torch.from_numpy(rng.integers(0, D, m)).cuda()) for _ in range(4)]
    counter = iter(range(10**9))

    def next_batch():
        return batches[next(counter) % len(batches)]

    head = stt.FactoredLinear(d, D, device="cuda")
    opt = stt.FactoredSGD(head, lr=LR)

    def factored_step():
        h, y = next_batch()
        opt.zero_grad()
        stt.linear_spherical_loss(h, head, y, eps=EPS, reduction="sum").backward()
        opt.step()

    if check:  # the factored step is the dense one: loss and input gradient against nn.Linear, float32
        linear = head.to_linear()
        h, y = batches[0]
        x1, x2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
        L_f = stt.linear_spherical_loss(x1, head, y, eps=EPS, reduction="sum")
        L_d = dense_spherical(linear(x2), y)
        L_f.backward()
        L_d.backward()
        head.zero_grad()
        row["check_rel_loss"] = float(abs(L_f - L_d) / abs(L_d))
        row["check_rel_grad"] = float((x1.grad - x2.grad).abs().max() / x2.grad.abs().max())
        linear = None
    for name, tf32 in (("factored", False), ("factored_tf32", True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        row[name] = guarded(factored_step)
        row[name]["peak_extra_mib"] = row[name].get("peak_extra_mib", 0) + \
            head._engine().core.workspace_bytes / 2**20
    torch.backends.cuda.matmul.allow_tf32 = False
    head = opt = None  # free the factored head before the dense one is built
    torch.cuda.empty_cache()

    try:
        linear = torch.nn.Linear(d, D, bias=False, device="cuda")
        sgd = torch.optim.SGD(linear.parameters(), lr=LR)
    except torch.cuda.OutOfMemoryError:
        linear = None
    for name, tf32, autocast in (("dense", False, False), ("dense_tf32", True, False), ("dense_bf16", False, True)):
        if linear is None:
            row[name] = {"ms": float("nan"), "oom": True}
            continue

        def dense_step(autocast=autocast):
            h, y = next_batch()
            sgd.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = dense_spherical(linear(h), y)
            loss.backward()
            sgd.step()

        torch.backends.cuda.matmul.allow_tf32 = tf32
        row[name] = guarded(dense_step, 5)
    torch.backends.cuda.matmul.allow_tf32 = False

    fused = {}
    if linear is not None and hasattr(F, "linear_cross_entropy"):
        fused["lce"] = lambda h, y: F.linear_cross_entropy(h, linear.weight, y, reduction="sum")
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        if linear is not None:
            fused["liger"] = lambda h, y: liger(linear.weight, h, y)
    except ImportError:
        row["liger"] = {"ms": float("nan"), "missing": "liger_kernel not installed"}
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        if linear is not None:
            fused["cce"] = lambda h, y: cce(h, linear.weight, y, reduction="sum")
    except ImportError:
        row["cce"] = {"ms": float("nan"), "missing": "cut_cross_entropy not installed"}
    for name, fn in fused.items():
        def fused_step(fn=fn):
            h, y = next_batch()
            sgd.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fn(h, y)
            loss.backward()
            sgd.step()

        try:
            row[name] = guarded(fused_step, 5)
        except Exception as err:  # a fused kernel that does not support this size or dtype
            row[name] = {"ms": float("nan"), "error": f"{type(err).__name__}: {err}"[:200]}
    linear = sgd = None
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two small sizes (a smoke run)")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args()
    usable, reason = st.cuda_status()
    if not (usable and torch.cuda.is_available()):
        sys.exit(f"bench_gpu.py needs a GPU and sparsetarget's CUDA backend: {reason}")
    props = torch.cuda.get_device_properties(0)
    rates = {"gemm_fp32": gemm_rate(False), "gemm_tf32": gemm_rate(True), "copy_bandwidth": copy_bandwidth()}
    info = {"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30, "machine": platform.machine(),
            "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "build": st.build_info(), "date": time.strftime("%Y-%m-%d"), "measured": rates}
    configs = [(50_000, 512, 200), (50_000, 512, 4096)] if args.quick else \
        [(D, d, m) for D in SIZES_D for d in SIZES_d for m in SIZES_m]
    print(f"# sparsetarget GPU benchmark, {props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}\n"
          f"# measured: fp32 GEMM {rates['gemm_fp32'] / 1e12:.1f} TFLOP/s, TF32 GEMM {rates['gemm_tf32'] / 1e12:.1f} "
          f"TFLOP/s, copy {rates['copy_bandwidth'] / 1e9:.0f} GB/s\n"
          "# one training step (forward + loss + backward + update), median ms; peak MiB added by the step; "
          "'bound' = max(FLOPs / GEMM rate, bytes / bandwidth) of the factored step\n")
    names = ("factored", "factored_tf32", "dense", "dense_tf32", "dense_bf16", "lce", "liger", "cce")
    print(f"{'D':>8} {'d':>5} {'m':>5} | " + " ".join(f"{n:>10}" for n in names) +
          f" | {'x dense':>7} {'x tf32':>7} {'x bf16':>7} {'x fused':>7} | {'bound':>6} {'of it':>6} | "
          f"{'fact MiB':>8} {'dense MiB':>9}")
    results = {"info": info, "configs": []}
    rng = np.random.default_rng(0)
    for i, (D, d, m) in enumerate(configs):
        r = bench_config(D, d, m, rng, check=(i == 0))
        flops, n_bytes = factored_cost(D, d, m)
        bound_ms = 1e3 * max(flops / rates["gemm_fp32"], n_bytes / rates["copy_bandwidth"])
        r["factored_flops"], r["factored_bytes"], r["factored_bound_ms"] = flops, n_bytes, bound_ms
        results["configs"].append(r)
        ms = {n: r.get(n, {}).get("ms", float("nan")) for n in names}
        f = ms["factored"]
        fused = np.nanmin([ms["lce"], ms["liger"], ms["cce"]]) if not all(
            np.isnan([ms["lce"], ms["liger"], ms["cce"]])) else float("nan")
        print(f"{D:>8} {d:>5} {m:>5} | " + " ".join(f"{ms[n]:>10.2f}" for n in names) +
              f" | {ms['dense'] / f:>6.0f}x {ms['dense_tf32'] / f:>6.0f}x {ms['dense_bf16'] / f:>6.0f}x "
              f"{fused / f:>6.0f}x | {bound_ms:>6.2f} {bound_ms / f:>5.0%} | "
              f"{r['factored'].get('peak_extra_mib', float('nan')):>8.1f} "
              f"{r['dense'].get('peak_extra_mib', float('nan')):>9.1f}", flush=True)
    name = re.sub(r"[^A-Za-z0-9]+", "_", props.name).strip("_").lower()
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"gpu_{'quick_' if args.quick else ''}{name}.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
