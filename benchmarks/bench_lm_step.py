"""Where a torch training step goes: the body alone, the head alone, body + head, under thread settings.

    python benchmarks/bench_lm_step.py [--vocab 100000] [--dim 128] [--batch 128] [--steps 60]

The body is the n-gram MLP of ``sparsetarget.examples.lm`` (4 context words, embeddings 64, hidden 256, d); the
heads are the factored spherical softmax (``FactoredLinear`` + ``FactoredSGD``) and, for scale, the dense softmax
(``nn.Linear`` + ``F.cross_entropy`` + SGD). If body + head costs clearly more than body + head timed apart, the two
get in each other's way (e.g. BLAS threads spinning next to torch's threads). Each (torch threads, BLAS threads)
setting runs in a fresh process, so that thread pools start as a user's script would start them. Writes
``benchmarks/results/lm_step_breakdown.{json,txt}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(vocab: int, dim: int, batch: int, steps: int, torch_threads: int, blas_threads: int,
            dense: bool) -> dict:
    """Median ms per step of body, head and body + head (run in this process)."""
    import sparsetarget
    import sparsetarget.torch as stt
    import torch
    import torch.nn.functional as F
    from sparsetarget.examples.lm import Body

    torch.set_num_threads(torch_threads)
    if blas_threads:  # 0: leave the count to sparsetarget.torch's default
        sparsetarget.set_num_threads(blas_threads)
    torch.manual_seed(0)
    body = Body(vocab, 4, 64, 256, dim)
    opt = torch.optim.SGD(body.parameters(), lr=0.01)
    head = stt.FactoredLinear(dim, vocab, bias=True)
    hopt = stt.FactoredSGD(head, lr=0.01)
    lin = torch.nn.Linear(dim, vocab)
    lopt = torch.optim.SGD(lin.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randint(0, vocab, (batch, 4), generator=g) for _ in range(steps)]
    ys = [torch.randint(0, vocab, (batch,), generator=g) for _ in range(steps)]
    h_fixed = torch.tanh(torch.randn(batch, dim, generator=g)).requires_grad_(True)  # the body needs dL/dh

    def body_only(i: int) -> None:
        opt.zero_grad()
        body(xs[i]).square().mean().backward()
        opt.step()

    def head_only(i: int) -> None:
        hopt.zero_grad()
        stt.linear_spherical_loss(h_fixed, head, ys[i], loss="spherical_softmax").backward()
        hopt.step()

    def both(i: int) -> None:
        opt.zero_grad()
        hopt.zero_grad()
        stt.linear_spherical_loss(body(xs[i]), head, ys[i], loss="spherical_softmax").backward()
        opt.step()
        hopt.step()

    def dense_head(i: int) -> None:
        lopt.zero_grad()
        F.cross_entropy(lin(h_fixed), ys[i]).backward()
        lopt.step()

    def dense_both(i: int) -> None:
        opt.zero_grad()
        lopt.zero_grad()
        F.cross_entropy(lin(body(xs[i])), ys[i]).backward()
        opt.step()
        lopt.step()

    cases = {"body": body_only, "factored head": head_only, "body + factored head": both}
    if dense:
        cases.update({"dense softmax head": dense_head, "body + dense softmax head": dense_both})
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        for i in range(2):
            fn(i)
    for i in range(steps):  # the cases take turns, so that a change of the machine's load hits them alike
        for name, fn in cases.items():
            if "dense" in name and i % 6:
                continue  # the dense steps are ~100x longer: fewer of them
            t0 = time.perf_counter()
            fn(i)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--settings", default="2x2,2x1,1x1,2x0",
                   help="torch threads x BLAS threads, comma-separated (0 BLAS threads: sparsetarget's default)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(HERE, "results", "lm_step_breakdown"))
    args = p.parse_args()
    if args.child:
        t, b = (int(v) for v in args.child.split("x"))
        res = measure(args.vocab, args.dim, args.batch, args.steps, t, b, dense=True)
        import sparsetarget
        res["blas_threads"] = sparsetarget.get_num_threads()
        print(json.dumps(res))
        return
    from sparsetarget.examples._common import machine

    rows = {}
    for setting in args.settings.split(","):
        res = subprocess.run([sys.executable, __file__, "--child", setting, "--vocab", str(args.vocab), "--dim",
                              str(args.dim), "--batch", str(args.batch), "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        rows[setting] = json.loads(res.stdout.strip().splitlines()[-1])
        print(setting, rows[setting], file=sys.stderr)
    lines = [f"torch training step breakdown, (D, d, m) = ({args.vocab}, {args.dim}, {args.batch}), median ms per "
             f"step; n-gram MLP body (4 x 64 embeddings, 256 hidden); factored head = spherical softmax",
             f"machine: {machine()}", ""]
    names = [n for n in next(iter(rows.values())) if n != "blas_threads"]
    lines.append("(BLAS threads 0: not set by the script, sparsetarget.torch's default; the count it ran with follows)")
    lines.append(f"{'torch x BLAS threads':>22} " + " ".join(f"{n:>26}" for n in names)
                 + f" {'overlap cost':>13}")
    for setting, r in rows.items():
        extra = r["body + factored head"] - r["body"] - r["factored head"]
        shown = setting if not setting.endswith("x0") else f"{setting} (={r['blas_threads']})"
        lines.append(f"{shown:>22} " + " ".join(f"{r[n]:>26.2f}" for n in names) + f" {extra:>+13.2f}")
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".txt", "w") as f:
        f.write(text + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump({"vocab": args.vocab, "dim": args.dim, "batch": args.batch, "machine": machine(),
                   "ms_per_step": rows}, f, indent=1)


if __name__ == "__main__":
    main()
