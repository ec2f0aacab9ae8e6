"""PyTorch CPU benchmark: one training step of the output layer (forward + loss + backward + SGD update).

Compared on the same thread count, float32, at the sizes of the core benchmark:
  - factored:   FactoredLinear + linear_spherical_loss (spherical softmax) + FactoredSGD (the torch front end)
  - core:       the same step through the NumPy API (FactoredOutput.step): the cost of the torch path
  - dense:      nn.Linear + the same loss written densely + torch.optim.SGD
  - lce:        torch.nn.functional.linear_cross_entropy (softmax: a different loss doing the same job) + SGD,
                its reference path and its chunked path (LinearCrossEntropyOptions())
Each factored configuration is first checked against the dense layer (loss and input gradient).

The torch path costs more than the NumPy step by its Python glue and by torch's autograd machinery. To tell the two
apart, the interleaved comparison also times "minimal": the same core calls (labels, fused loss and gradient, step)
in the smallest torch.autograd.Function that can carry them, without the front end's checks: what any autograd
front end over this core would at least cost on this machine. "ratio" divides the medians over all calls;
"bursts" is the median over the rounds of each burst's median over that of the NumPy step's burst in the same
round (a fraction of a second apart). Each torch step takes the batch as a new leaf over its memory (no copy), as a
body's output reaches the head. A last table times the three at a tiny size with warm caches and with each call
starting cold (after a pass over twice the last-level cache), as after a long step: the front end's overhead
growing with the step it follows is consistent with its Python and autograd code then running from memory.

Run:  python benchmarks/bench_torch_cpu.py [--threads 1] [--quick]
Prints a table and writes benchmarks/results/torch_cpu_<threads>thread.json (and .txt when redirected).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from typing import Callable

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--threads", type=int, default=1, help="threads for torch and BLAS (default 1)")
ap.add_argument("--quick", action="store_true", help="small sizes only (a smoke run, seconds)")
ap.add_argument("--out", default=None, help="JSON output path")
args = ap.parse_args()
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(args.threads)

import numpy as np  # noqa: E402
import sparsetarget as st  # noqa: E402
import sparsetarget.torch as stt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _machine import machine_info  # noqa: E402
from _memory import reset_peak, rss_mib  # noqa: E402
from sparsetarget import _core  # noqa: E402
from torch.autograd.function import once_differentiable  # noqa: E402

torch.set_num_threads(args.threads)
st.set_num_threads(args.threads)
LR = 0.05
EPS = 1e-2


def measure(fn, min_reps: int, min_seconds: float) -> dict:
    """Median ms of fn() after one warm-up call, and the peak RSS it added above the resident size before."""
    fn()
    reset_peak()
    base = rss_mib("VmRSS")
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_seconds and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"ms": float(np.median(times)) * 1e3, "reps": len(times), "peak_extra_mib": rss_mib("VmHWM") - base}


def interleaved(fns: dict, bursts: int = 25, calls: int = 8, flush: np.ndarray | None = None) -> dict:
    """The functions in alternating bursts of ``calls`` calls, ``bursts`` rounds. Returns "ms": the median ms of
    each over all its calls, and "burst_ratio": the median over the rounds of each one's burst median divided by
    that of the last function in the same round (a slow spell of the machine falls on both alike). With ``flush``
    (an array larger than the caches), every call is preceded, untimed, by a pass writing it: each call then starts
    with cold caches, as after a long step."""
    times: dict = {name: [] for name in fns}
    burst_medians: dict = {name: [] for name in fns}
    for _ in range(bursts):
        for name, fn in fns.items():
            burst = []
            for _ in range(calls):
                if flush is not None:
                    flush += 1
                t0 = time.perf_counter()
                fn()
                burst.append(time.perf_counter() - t0)
            times[name] += burst
            burst_medians[name].append(np.median(burst))
    last = np.array(burst_medians[list(fns)[-1]])
    return {"ms": {name: float(np.median(t)) * 1e3 for name, t in times.items()},
            "burst_ratio": {name: float(np.median(np.array(b) / last)) for name, b in burst_medians.items()}}


class MinimalHead(torch.autograd.Function):
    """(h, anchor, labels, core, spec, D) -> the summed loss; backward hands dL/dh to autograd and keeps the update,
    which ``minimal_step`` applies. No checks beyond the core's own: a floor for the torch path, not an API."""

    @staticmethod
    def forward(ctx, h, anchor, labels, core, spec, D):  # noqa: ANN001, ANN205
        targets = _core.class_targets(labels.numpy(), D, -100, "target")
        out = core.loss_gradient(h.detach().numpy(), *targets, spec, True, True)
        ctx.update = (out[7], targets, out[1], out[2], out[3], out[4], out[5])
        return torch.full((), out[6], dtype=h.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        PENDING.append(ctx.update)
        return torch.from_numpy(ctx.update[6].copy()), None, None, None, None, None


PENDING: list = []


def minimal_step(core, spec, D: int, h: torch.Tensor, y: torch.Tensor, anchor: torch.Tensor) -> None:
    PENDING.clear()
    MinimalHead.apply(h, anchor, y, core, spec, D).backward()
    H, (indptr, indices, _, _), dA, dq, ds, projections, grad_H = PENDING[0]
    core.backward_step(H, indptr, indices, dA, dq, ds, LR, 0.0, projections, grad_H)


def dense_spherical(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    num = o * o + EPS
    return (torch.log(num.sum(1)) - torch.log(num.gather(1, y[:, None])[:, 0])).sum()


def three_steps(D: int, d: int, m: int, rng: np.random.Generator,
                row: dict) -> tuple[dict, torch.nn.Linear, Callable[[], tuple]]:
    """The torch front end's step, the NumPy step and the minimal Function's step on three copies of one W, each
    first checked against nn.Linear + the dense loss (errors into ``row``). Returns the steps by name, that
    nn.Linear (the dense baselines' start) and a function giving the next (h, y) batch as the torch steps take
    it."""
    torch.manual_seed(0)
    head = stt.FactoredLinear(d, D)
    opt = stt.FactoredSGD(head, lr=LR)
    batches = [(torch.from_numpy((rng.standard_normal((m, d)) / np.sqrt(d)).astype(np.float32)),
                torch.from_numpy(rng.integers(0, D, m))) for _ in range(8)]
    linear = head.to_linear()
    # correctness first, at the same W: loss and dL/dh of the factored head against nn.Linear + the dense loss
    h, y = batches[0]
    hf, hd = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    Lf = stt.linear_spherical_loss(hf, head.requires_grad_(False), y, eps=EPS, reduction="sum")
    Lf.backward()
    Ld = dense_spherical(linear(hd), y)
    Ld.backward()
    head.requires_grad_(True)
    row["check_rel_err_loss"] = float(abs(Lf.item() - Ld.item()) / abs(Ld.item()))
    row["check_rel_err_grad_h"] = float((hf.grad - hd.grad).abs().max() / hd.grad.abs().max())
    assert row["check_rel_err_loss"] < 1e-4 and row["check_rel_err_grad_h"] < 1e-3, row
    linear.zero_grad(set_to_none=True)
    counter = iter(range(10**9))

    def next_batch():
        # a new leaf over the batch's memory (no copy), as a body's output reaches the head; the NumPy step takes
        # its arrays as they are too, so a copy here would be timed as the torch path's cost
        h, y = batches[next(counter) % len(batches)]
        return h.detach().requires_grad_(True), y

    def factored_step():
        h, y = next_batch()
        opt.zero_grad()
        stt.linear_spherical_loss(h, head, y, eps=EPS, reduction="sum").backward()
        opt.step()

    np_batches = [(h.numpy(), y.numpy()) for h, y in batches]
    spec_layer = st.FactoredOutput(linear.weight.detach().numpy(), loss="spherical_softmax", eps=EPS)

    def core_step():
        spec_layer.step(*np_batches[next(counter) % 8], LR)

    # a third layer, trained by the minimal autograd Function over the core (same sizes, its own copy of W)
    minimal_layer = st.FactoredOutput(linear.weight.detach().numpy(), loss="spherical_softmax", eps=EPS)
    anchor = torch.zeros((), requires_grad=True)
    hm = batches[0][0].clone().requires_grad_(True)
    Lm = MinimalHead.apply(hm, anchor, batches[0][1], minimal_layer._engine.core, minimal_layer._spec, D)
    Lm.backward()
    PENDING.clear()  # the check's update is not applied
    row["check_rel_err_minimal"] = float(abs(Lm.item() - Ld.item()) / abs(Ld.item()))
    row["check_rel_err_minimal_grad_h"] = float((hm.grad - hd.grad).abs().max() / hd.grad.abs().max())
    assert row["check_rel_err_minimal"] < 1e-4 and row["check_rel_err_minimal_grad_h"] < 1e-3, row

    def minimal():
        h, y = next_batch()
        minimal_step(minimal_layer._engine.core, minimal_layer._spec, D, h, y, anchor)

    return {"factored": factored_step, "minimal": minimal, "core": core_step}, linear, next_batch


def bench_config(D: int, d: int, m: int, rng: np.random.Generator) -> dict:
    row: dict = {"D": D, "d": d, "m": m}
    steps, linear, next_batch = three_steps(D, d, m, rng, row)
    row["factored"] = measure(steps["factored"], 10, 1.5)
    row["core"] = measure(steps["core"], 10, 1.5)
    # the cost of the torch path: the steps in alternating bursts, so that the machine's load falls on all alike
    timed = interleaved(steps, bursts=40)
    row["interleaved_ms"], row["interleaved_burst_ratio"] = timed["ms"], timed["burst_ratio"]

    sgd = torch.optim.SGD(linear.parameters(), lr=LR)
    reps = 2 if D * m > 5e7 else 5

    def dense_step():
        h, y = next_batch()
        sgd.zero_grad()
        dense_spherical(linear(h), y).backward()
        sgd.step()

    row["dense"] = measure(dense_step, reps, 0.0)
    for name, options in (("lce", None), ("lce_chunked", torch.nn.LinearCrossEntropyOptions())):
        def lce_step(options=options):
            h, y = next_batch()
            sgd.zero_grad()
            F.linear_cross_entropy(h, linear.weight, y, reduction="sum", options=options).backward()
            sgd.step()

        row[name] = measure(lce_step, reps, 0.0)
    row["W_mib"] = D * d * 4 / 2**20
    return row


def front_end_caches(rng: np.random.Generator) -> dict:
    """The cost of the torch path and of the minimal Function over the NumPy step at a size where the core's work
    is small, with warm caches and with every call starting cold (a pass over twice the last-level cache before it,
    at least 64 MiB, as a long step leaves them): what their Python and autograd code costs when it is read from
    memory instead of the caches."""
    row: dict = {"D": 2000, "d": 16, "m": 4, "flush_mib": max(64, 2 * last_level_cache_mib())}
    steps, _, _ = three_steps(row["D"], row["d"], row["m"], rng, row)
    row["warm_ms"] = interleaved(steps)["ms"]
    row["cold_ms"] = interleaved(steps, flush=np.ones(row["flush_mib"] * 2**18, dtype=np.float32))["ms"]
    return row


def last_level_cache_mib() -> int:
    """The largest CPU cache's size in MiB from sysfs (0 where it cannot be read)."""
    sizes = [0]
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        scale = {"K": 1 / 1024, "M": 1, "G": 1024}.get(text[-1:], 1 / 2**20)
        sizes.append(int(float(text.rstrip("KMG")) * scale))
    return max(sizes)


def main() -> None:
    rng = np.random.default_rng(0)
    info = machine_info(threads=args.threads, torch=torch.__version__, numpy=np.__version__, build=st.build_info(),
                        date=time.strftime("%Y-%m-%d"))
    if args.quick:
        configs = [(20000, 128, 64), (20000, 128, 1)]
    else:
        configs = [(793471, 512, 200), (200000, 512, 128), (100000, 256, 128), (793471, 512, 1)]
    print(f"# sparsetarget torch CPU benchmark, {info['cpu']}, {args.threads} thread(s), float32, torch "
          f"{torch.__version__}\n# one training step (forward + loss + backward + SGD update), median ms; peak MiB "
          "added during the step\n")
    print(f"{'D':>7} {'d':>4} {'m':>4} | {'factored':>9} {'core':>7} | {'dense':>9} {'lce':>9} {'lce chunk':>9} | "
          f"{'vs dense':>8} {'vs lce':>7} | {'fact MiB':>8} {'dense MiB':>9} {'lce MiB':>8} {'chunk MiB':>9} | "
          f"{'interleaved: torch':>18} {'core':>7} {'ratio':>6} {'+ms':>6} {'bursts':>6} | {'minimal':>7} {'ratio':>6} "
          f"{'+ms':>6} {'bursts':>6}")
    results = {"info": info, "configs": []}
    for D, d, m in configs:
        r = bench_config(D, d, m, rng)
        results["configs"].append(r)
        f, c, dn, lc, lk = (r[k]["ms"] for k in ("factored", "core", "dense", "lce", "lce_chunked"))
        tf, tn, tc = (r["interleaved_ms"][k] for k in ("factored", "minimal", "core"))
        bf, bn = (r["interleaved_burst_ratio"][k] for k in ("factored", "minimal"))
        print(f"{D:>7} {d:>4} {m:>4} | {f:>9.2f} {c:>7.2f} | {dn:>9.1f} {lc:>9.1f} {lk:>9.1f} | {dn / f:>7.0f}x "
              f"{min(lc, lk) / f:>6.0f}x | {r['factored']['peak_extra_mib']:>8.1f} "
              f"{r['dense']['peak_extra_mib']:>9.1f} {r['lce']['peak_extra_mib']:>8.1f} "
              f"{r['lce_chunked']['peak_extra_mib']:>9.1f} | {tf:>18.3f} {tc:>7.3f} {tf / tc:>6.3f} {tf - tc:>6.3f} "
              f"{bf:>6.3f} | {tn:>7.3f} {tn / tc:>6.3f} {tn - tc:>6.3f} {bn:>6.3f}", flush=True)
    caches = front_end_caches(rng)
    results["front_end_caches"] = caches
    print(f"\n# the same steps at (D, d, m) = ({caches['D']}, {caches['d']}, {caches['m']}): ms over the NumPy step, "
          f"with warm caches and with each call starting cold (after a {caches['flush_mib']} MiB pass)\n"
          f"{'caches':>6} | {'torch +ms':>9} {'minimal +ms':>11} | {'core ms':>7}")
    for name in ("warm", "cold"):
        t = caches[f"{name}_ms"]
        print(f"{name:>6} | {t['factored'] - t['core']:>9.3f} {t['minimal'] - t['core']:>11.3f} | {t['core']:>7.3f}")
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"torch_cpu_{'quick_' if args.quick else ''}{args.threads}thread.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
