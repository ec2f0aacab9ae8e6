"""Distributed benchmark: traffic and step time of the output layer on torch.distributed (gloo, CPU processes).

Measured, side by side and interleaved, with 2 processes (1 thread each), float32, a small body (Linear(d, d) + tanh)
and the output layer at (D, d, m) = (200000, 256, 128 rows per rank) by default:
  - dense DDP:       DistributedDataParallel(body + nn.Linear(d, D)), cross-entropy, torch.optim.SGD: DDP all-reduces
                     the D x d weight gradient at every step
  - factored DP:     DDP(body + FactoredLinear), spherical softmax, FactoredSGD(process_group=WORLD): all-gathers
                     the O(m d + nnz) update inputs of every rank
  - factored VP:     FactoredLinear(vocab_parallel_group=WORLD): each rank keeps D/2 rows of V, both ranks see the
                     same batch (so a step trains m rows, not 2m); all-reduces nnz + 2m values forward, m x d backward
  - factored alone:  each process trains its own FactoredLinear on its m rows, no communication (the compute floor)
Bytes: what each rank hands to collectives per step (counted by wrapping torch.distributed's functions; DDP's
gradient all-reduce counted from its parameters), and the bytes each rank sends with ring algorithms (all-reduce of
n bytes: 2 (W-1)/W n; all-gather of c bytes per rank: (W-1) c). Each distributed mode is first checked against
dense float64 training of the same objective at a small size.

Also computed (not measured): the traffic per rank and step at One-Billion-Word scale (D = 793,471, d = 512,
4096 tokens per rank, 8 and 64 ranks) for dense DDP, Megatron-style vocab-parallel softmax, and both of our modes.

Run:  python benchmarks/bench_distributed.py [--quick]
Prints a table and writes benchmarks/results/distributed.json (and .txt when redirected).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--D", type=int, default=200_000)
ap.add_argument("--d", type=int, default=256)
ap.add_argument("--m", type=int, default=128, help="rows per rank per step")
ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each times --steps steps of every mode")
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--quick", action="store_true", help="a small size (a smoke run, seconds)")
ap.add_argument("--out", default=None, help="JSON output path")
args = ap.parse_args()
if args.quick:
    args.D, args.d, args.m, args.rounds, args.steps = 5000, 64, 32, 2, 2
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import numpy as np  # noqa: E402
import sparsetarget as st  # noqa: E402
import sparsetarget.torch as stt  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _machine import cpu_model  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

WORLD = 2
LR = 0.05
EPS = 1e-2
FLOAT, INT = 4, 8  # bytes of float32 and int64


# ---------------------------------------------------------------------------------------------- counting bytes
class Traffic:
    """Bytes handed to collectives by this process, by wrapping torch.distributed's functions."""

    def __init__(self) -> None:
        self.payload = 0
        self.sent = 0.0
        self.counting = False
        for name in ("all_reduce", "all_gather", "broadcast"):
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def counted(*a, **kw):
            if self.counting:
                world = dist.get_world_size(kw.get("group"))
                if name == "all_gather":
                    self.add_all_gather(a[1].numel() * a[1].element_size(), world)
                elif name == "all_reduce":
                    self.add_all_reduce(a[0].numel() * a[0].element_size(), world)
                else:
                    self.payload += a[0].numel() * a[0].element_size()
                    self.sent += a[0].numel() * a[0].element_size()
            return fn(*a, **kw)
        return counted

    def add_all_reduce(self, n: int, world: int) -> None:
        self.payload += n
        self.sent += 2 * (world - 1) / world * n

    def add_all_gather(self, n: int, world: int) -> None:
        self.payload += n
        self.sent += (world - 1) * n


# ---------------------------------------------------------------------------------------------- the modes
class FactoredNet(nn.Module):
    def __init__(self, body: nn.Module, head: stt.FactoredLinear, reduction: str = "mean") -> None:
        super().__init__()
        self.body, self.head, self.reduction = body, head, reduction

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return stt.linear_spherical_loss(self.body(x), self.head, y, eps=EPS, reduction=self.reduction)


def body(d: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(d, d, dtype=dtype), nn.Tanh())


def factored_mode(kind: str, D: int, d: int, dtype: torch.dtype = torch.float32, weight=None, bias=None,
                  reduction: str = "mean"):
    """(step(x, y), model) for 'dp' (DDP + FactoredSGD with the group), 'vp' (vocab parallel), 'alone'."""
    torch.manual_seed(2)
    group = dist.group.WORLD
    head = stt.FactoredLinear(d, D, bias=True, dtype=dtype, weight=weight, initial_bias=bias,
                              vocab_parallel_group=group if kind == "vp" else None)
    model = FactoredNet(body(d, dtype), head, reduction)
    wrapped = DDP(model) if kind == "dp" else model
    sgd = torch.optim.SGD(model.body.parameters(), lr=LR)
    fsgd = stt.FactoredSGD(head, lr=LR, process_group=group if kind == "dp" else None)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sgd.zero_grad()
        fsgd.zero_grad()
        loss = wrapped(x, y)
        loss.backward()
        sgd.step()
        fsgd.step()
        return loss

    return step, model, ddp_bytes(model.body) if kind == "dp" else 0


def ddp_bytes(module: nn.Module) -> int:
    """Bytes of the gradients DDP all-reduces at each step (its reducer runs in C++, unseen by Traffic)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def dense_mode(D: int, d: int):
    torch.manual_seed(2)
    model = nn.Sequential(body(d, torch.float32), nn.Linear(d, D))
    ddp = DDP(model)
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    grad_bytes = ddp_bytes(model)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sgd.zero_grad()
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        sgd.step()
        return loss

    return step, grad_bytes


# ---------------------------------------------------------------------------------------------- correctness first
def check_modes(rank: int) -> dict:
    """One step of each distributed mode at a small size in float64 against dense SGD on the same objective."""
    D, d, m = 1001, 33, 17
    rng = np.random.default_rng(0)
    W0 = torch.from_numpy(rng.uniform(-0.2, 0.2, (D, d)))
    b0 = torch.from_numpy(rng.uniform(-0.2, 0.2, D))
    xs = [torch.from_numpy(rng.standard_normal((m, d))) for _ in range(WORLD)]
    ys = [torch.from_numpy(rng.integers(0, D, m)) for _ in range(WORLD)]
    errors = {}
    for kind in ("dp", "vp"):
        step, model, _ = factored_mode(kind, D, d, torch.float64, W0, b0, reduction="sum")
        batches = list(zip(xs, ys)) if kind == "dp" else [(xs[0], ys[0])]
        step(*batches[rank % len(batches)])
        ref_body = body(d, torch.float64)
        ref_head = nn.Linear(d, D, dtype=torch.float64)
        with torch.no_grad():
            ref_head.weight.copy_(W0)
            ref_head.bias.copy_(b0)
        total = 0
        for x, y in batches:
            o = ref_head(ref_body(x))
            num = o * o + EPS
            total = total + (torch.log(num.sum(1)) - torch.log(num.gather(1, y[:, None])[:, 0])).sum()
        (total / len(batches)).backward()  # DDP averages over the ranks
        with torch.no_grad():
            for p in [*ref_body.parameters(), *ref_head.parameters()]:
                p -= LR * p.grad
        with torch.no_grad():
            err = max(float((model.head.dense_weight() - ref_head.weight).abs().max()),
                      float((model.head.dense_bias() - ref_head.bias).abs().max()),
                      *(float((p - q).abs().max()) for p, q in zip(model.body.parameters(), ref_body.parameters())))
            scale = float(ref_head.weight.abs().max())
        errors[kind] = err / scale
        if not err <= 1e-10 * scale:
            raise AssertionError(f"{kind}: one step differs from dense SGD by {err / scale:.3g} (relative)")
    return errors


# ---------------------------------------------------------------------------------------------- timing
def worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    st.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    traffic = Traffic()
    errors = check_modes(rank)
    D, d, m = args.D, args.d, args.m
    rng = np.random.default_rng(10 + rank)
    shared = np.random.default_rng(99)
    batches = {"own": [(torch.from_numpy((rng.standard_normal((m, d)) / np.sqrt(d)).astype(np.float32)),
                        torch.from_numpy(rng.integers(0, D, m))) for _ in range(4)],
               "same": [(torch.from_numpy((shared.standard_normal((m, d)) / np.sqrt(d)).astype(np.float32)),
                         torch.from_numpy(shared.integers(0, D, m))) for _ in range(4)]}
    modes = {"dense DDP": (*dense_mode(D, d), "own"),
             "factored DP": (*factored_mode("dp", D, d)[::2], "own"),
             "factored VP": (*factored_mode("vp", D, d)[::2], "same"),
             "factored alone": (*factored_mode("alone", D, d)[::2], "own")}
    rows = {}
    for name, (step, reducer_bytes, which) in modes.items():  # warm-up, and the bytes of one step
        step(*batches[which][0])
        traffic.payload, traffic.sent, traffic.counting = 0, 0.0, True
        step(*batches[which][1])
        traffic.counting = False
        if reducer_bytes:
            traffic.add_all_reduce(reducer_bytes, WORLD)
        rows[name] = {"payload_bytes": traffic.payload, "sent_bytes": traffic.sent, "times": [],
                      "rows_per_step": m * (1 if which == "same" or name == "factored alone" else WORLD)}
    for r in range(args.rounds):
        for name, (step, _, which) in modes.items():
            for i in range(args.steps):
                dist.barrier()
                t0 = time.perf_counter()
                step(*batches[which][(r + i) % 4])
                dist.barrier()
                rows[name]["times"].append(time.perf_counter() - t0)
    if rank == 0:
        for row in rows.values():
            row["ms"] = float(np.median(row.pop("times"))) * 1e3
        with open(out, "w") as f:
            json.dump({"rows": rows, "check_rel_err": errors}, f)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- computed table
def computed_traffic(D: int, d: int, m: int, W: int) -> dict:
    """Bytes each rank sends per step (ring algorithms, float32 values, int64 indices, class targets: nnz = m),
    for a step on W x m tokens. Vocab parallel: one group of W ranks that all see the W m tokens (tensor
    parallelism); data parallel: W ranks with m tokens each. The body's own traffic is left out (the same in all)."""
    M = W * m
    all_reduce = 2 * (W - 1) / W
    return {
        "dense DDP (all-reduce of the D x d gradient)": all_reduce * D * d * FLOAT,
        "Megatron vocab-parallel softmax (max, sum-exp, target logit; M x d input gradient)":
            all_reduce * (3 * M + M * d) * FLOAT,
        "factored VP (nnz + 2M outputs; M x d hidden gradient)": all_reduce * (3 * M + M * d) * FLOAT,
        "factored DP (all-gather of H, dA, dq, ds, targets)":
            (W - 1) * ((m * d + 3 * m) * FLOAT + (2 * m + 2) * INT),
    }


def human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def machine() -> str:
    """The CPU model and core count."""
    return f"{cpu_model()}, {os.cpu_count()} cores"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(os.path.join(tmp, "init"), out), nprocs=WORLD, join=True)
        with open(out) as f:
            measured = json.load(f)
    rows = measured["rows"]
    print(f"torch.distributed, gloo, {WORLD} processes on {machine()}, 1 thread "
          f"each, float32; D = {args.D}, d = {args.d}, m = {args.m} rows per rank")
    print(f"checked first (one step vs dense float64 SGD, relative error): {measured['check_rel_err']}")
    print("rows/step: rows one step trains (factored alone: per process, each its own head)")
    print(f"{'mode':<16} {'rows/step':>9} {'to collectives/rank':>20} {'sent/rank (ring)':>17} {'step ms':>9}")
    for name, row in rows.items():
        print(f"{name:<16} {row['rows_per_step']:>9} {human(row['payload_bytes']):>20} {human(row['sent_bytes']):>17} "
              f"{row['ms']:>9.1f}")
    computed = {}
    print("\nComputed: bytes sent per rank per step at One-Billion-Word scale (D = 793,471, d = 512, 4096 tokens per "
          "rank, float32)")
    for W in (8, 64):
        computed[W] = computed_traffic(793_471, 512, 4096, W)
    names = list(computed[8])
    print(f"{'':<88} {'8 ranks':>9} {'64 ranks':>9}")
    for name in names:
        print(f"{name:<88} {human(computed[8][name]):>9} {human(computed[64][name]):>9}")
    print("\nThe data-parallel step applies the W m stacked rows of the group on every rank. From 2d rows on it forms "
          "its Q update from d x d pieces (docs/algorithm.md 5.10), not from the (W m) x (W m) Gram matrix G that "
          "would take:")
    gram = {}
    d_1b = 512
    for W in (2, 8, 64):
        rows_stacked = W * 4096
        step_bytes = (rows_stacked * d_1b * 8 + d_1b * d_1b * 8) * FLOAT  # about 8 m x d and 8 d x d buffers
        gram[W] = {"rows_stacked": rows_stacked, "gram_bytes_float32": rows_stacked**2 * FLOAT,
                   "step_scratch_bytes_float32_approx": step_bytes}
        print(f"  {W:>2} ranks x 4096 tokens: {rows_stacked} rows, G would be {human(rows_stacked**2 * FLOAT)}; the "
              f"step's scratch is about {human(step_bytes)} in float32")
    result = {"machine": machine(), "world": WORLD,
              "D": args.D, "d": args.d, "m": args.m, "rounds": args.rounds, "steps": args.steps,
              "measured": rows, "check_rel_err": measured["check_rel_err"],
              "computed_1b_words": {str(W): v for W, v in computed.items()},
              "data_parallel_gram_1b_words": {str(W): v for W, v in gram.items()}}
    path = args.out or os.path.join(os.path.dirname(__file__), "results",
                                    "distributed_quick.json" if args.quick else "distributed.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
