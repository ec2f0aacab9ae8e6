"""A factored head next to a real torch body: is the whole training step as fast as its two halves?

Run:  python benchmarks/bench_torch_body.py [--rounds 9] [--blas-threads N]

Model: body = Linear(512, 1024) - ReLU - Linear(1024, 1024) - ReLU - Linear(1024, 512) trained by Adam, head =
FactoredLinear(512, D) with the spherical softmax loss trained by FactoredSGD; float32, batches of m rows. Three
steps are timed in interleaved bursts, each with its own copy of the weights (same seeds):

- body alone: forward, a loss on the body's output that costs nothing next to the head (0.5 ||H||^2 / m), backward,
  Adam step;
- head alone: forward, loss, backward and FactoredSGD step on a fixed H (requires_grad, as the body's output is);
- together: the body's output fed to the head, one backward through both, both optimiser steps.

The ratio together / (body alone + head alone) says whether the two halves slow each other down (1: not at all).
Settings are the defaults (torch's intra-op threads; sparsetarget's BLAS threads as chosen by
``threads_for_torch()``) unless ``--blas-threads`` forces a count for the head's OpenBLAS. Before timing, one
together-step is checked against the same step with a dense head (nn.Linear weight = the factored W, dense loss,
SGD) in float64. Writes benchmarks/results/torch_body_<host>.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--rounds", type=int, default=9, help="interleaved bursts per configuration")
ap.add_argument("--burst", type=float, default=1.0, help="seconds per burst")
ap.add_argument("--blas-threads", type=int, default=None, help="force the head's BLAS threads (default: library's)")
ap.add_argument("--shapes", default="200000,512,128;793471,512,200", help="D,d,m;...")
ap.add_argument("--out", default=None, help="JSON output path")
args = ap.parse_args()

import sparsetarget as st  # noqa: E402
import sparsetarget.torch as stt  # noqa: E402
import torch  # noqa: E402
from _machine import machine_info, write_results  # noqa: E402
from torch import nn  # noqa: E402

if args.blas_threads is not None:
    st.set_num_threads(args.blas_threads)
LR = 0.05
EPS = 1e-2


def make_body(d: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, d)).to(dtype)


def check(d: int) -> float:
    """One together-step, factored vs dense head, float64, small D: max relative difference of body weights."""
    D, m = 3001, 17
    body_f = make_body(d, torch.float64)
    body_d = copy.deepcopy(body_f)
    torch.manual_seed(1)
    head = stt.FactoredLinear(d, D, dtype=torch.float64)
    dense = nn.Linear(d, D, bias=False).double()
    with torch.no_grad():
        dense.weight.copy_(head.dense_weight())
    x = torch.randn(m, 512, dtype=torch.float64)
    y = torch.randint(0, D, (m,))
    opt_f = [torch.optim.Adam(body_f.parameters(), 1e-3), stt.FactoredSGD(head, lr=LR)]
    opt_d = [torch.optim.Adam(body_d.parameters(), 1e-3), torch.optim.SGD(dense.parameters(), lr=LR)]
    stt.linear_spherical_loss(body_f(x), head, y, loss="spherical_softmax", reduction="sum").backward()
    o = dense(body_d(x))
    num = o * o + EPS
    (torch.log(num.sum(1)) - torch.log(num[torch.arange(m), y])).sum().backward()
    for opt in opt_f + opt_d:
        opt.step()
    with torch.no_grad():
        err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(body_f.parameters(),
                                                                              body_d.parameters()))
        err = max(err, float((head.dense_weight() - dense.weight).abs().max() / dense.weight.abs().max()))
    if err > 1e-10:
        raise SystemExit(f"factored and dense heads disagree after one step: {err:.3g}")
    return err


def burst(step, seconds: float) -> float:
    times = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop or len(times) < 3:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def run_shape(D: int, d: int, m: int) -> dict:
    rng = torch.Generator().manual_seed(2)
    xs = [torch.randn(m, 512, generator=rng) for _ in range(8)]
    ys = [torch.randint(0, D, (m,), generator=rng) for _ in range(8)]
    hs = [torch.randn(m, d, generator=rng).div_(d**0.5).requires_grad_() for _ in range(8)]
    torch.manual_seed(3)
    head_a, head_b = stt.FactoredLinear(d, D), None
    head_b = copy.deepcopy(head_a)
    body_a, body_b = make_body(d), make_body(d)
    opt_body_a, opt_body_b = torch.optim.Adam(body_a.parameters(), 1e-4), torch.optim.Adam(body_b.parameters(), 1e-4)
    opt_head_a, opt_head_b = stt.FactoredSGD(head_a, lr=LR), stt.FactoredSGD(head_b, lr=LR)
    count = [0]

    def body_alone() -> None:
        i = count[0] % 8
        count[0] += 1
        opt_body_a.zero_grad()
        h = body_a(xs[i])
        (0.5 * (h * h).sum() / m).backward()
        opt_body_a.step()

    def head_alone() -> None:
        i = count[0] % 8
        count[0] += 1
        opt_head_a.zero_grad()
        stt.linear_spherical_loss(hs[i], head_a, ys[i], loss="spherical_softmax").backward()
        opt_head_a.step()

    def together() -> None:
        i = count[0] % 8
        count[0] += 1
        opt_body_b.zero_grad()
        opt_head_b.zero_grad()
        stt.linear_spherical_loss(body_b(xs[i]), head_b, ys[i], loss="spherical_softmax").backward()
        opt_body_b.step()
        opt_head_b.step()

    steps = {"body": body_alone, "head": head_alone, "together": together}
    for fn in steps.values():
        fn()
    res: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            res[name].append(burst(steps[name], args.burst))
    med = {k: statistics.median(v) for k, v in res.items()}
    ratios = [t / (b + h) for b, h, t in zip(res["body"], res["head"], res["together"])]
    return {"shape": (D, d, m), "body_ms": med["body"], "head_ms": med["head"], "together_ms": med["together"],
            "ratio": statistics.median(ratios), "bursts": res}


def main() -> None:
    err = check(64)
    print(f"check: one body + head step, factored vs dense head in float64: max relative difference {err:.1e}")
    print(f"torch threads {torch.get_num_threads()}, sparsetarget BLAS threads {st.get_num_threads()}")
    print(f"{'(D, d, m)':>20} {'body ms':>8} {'head ms':>8} {'sum':>8} {'together':>9} {'ratio':>6}")
    rows = []
    for s in args.shapes.split(";"):
        D, d, m = (int(x) for x in s.split(","))
        row = run_shape(D, d, m)
        rows.append(row)
        print(f"{str((D, d, m)):>20} {row['body_ms']:8.2f} {row['head_ms']:8.2f} "
              f"{row['body_ms'] + row['head_ms']:8.2f} {row['together_ms']:9.2f} {row['ratio']:6.3f}", flush=True)
    machine = machine_info(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                           blas_threads=st.get_num_threads())
    out = write_results("torch_body", {"machine": machine, "rounds": args.rounds, "burst_s": args.burst, "check": err,
                                       "rows": rows}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
