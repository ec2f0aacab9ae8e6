"""Learning-rate pilot for the language-model example: each head, a few learning rates, a fixed number of steps.

    python benchmarks/lm_lr_pilot.py --corpus gcide.dict.dz [--vocab-size 20000] [--steps 200]

Short and at a smaller D than the full runs (the dense heads cost O(D d) per step): it only picks, per head, the
learning rate with the best held-out top-10 after ``--steps`` steps on the same batches. The body's learning rate
is fixed (0.1). Prints one line per (head, lr) and the choice; writes ``benchmarks/results/lm_lr_pilot.txt``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from sparsetarget.examples import lm
from sparsetarget.examples._common import machine, set_threads

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True)
    p.add_argument("--vocab-size", type=int, default=20_000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lrs", default="0.03,0.1,0.3,1.0")
    p.add_argument("--heads", default=",".join(h for h in lm.HEADS if h != "dense_spherical"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "lm_lr_pilot.txt"))
    a = p.parse_args()
    args = lm.parse_args(["--corpus", a.corpus, "--vocab-size", str(a.vocab_size), "--out", "unused",
                          "--eval-words", "1000", "--threads", "1"])
    set_threads(1, 1)
    vocab, train, valid = lm.load_data(args)
    import numpy as np

    D = len(vocab)
    batches = lm.Batches(train, args.context, args.batch, D, args.seed)
    pos = np.sort(np.random.default_rng(args.seed + 3).choice(len(valid), size=args.eval_words, replace=False))
    eval_x = torch.from_numpy(lm.data.ngram_contexts(valid, pos, args.context, D))
    eval_y = torch.from_numpy(valid.ids[pos].astype(np.int64))
    log_unigram = torch.zeros(D)
    lines = [f"lr pilot: D = {D}, d = {args.dim}, batch {args.batch}, {a.steps} steps, body lr {args.body_lr}; "
             f"{machine()}"]
    for head in a.heads.split(","):
        best = None
        for lr in (float(x) for x in a.lrs.split(",")):
            tr = lm.LMTrainer(head, args, D, batches, eval_x, eval_y, lr, log_unigram)
            try:
                for i in range(a.steps):
                    loss = tr.train_step(i)
                    if loss != loss:
                        raise FloatingPointError("nan")
                m = tr.evaluate()
            except (FloatingPointError, ValueError) as err:  # diverged, or a singular factored update
                lines.append(f"{head:>17} lr {lr:<5} failed: {type(err).__name__}")
                print(lines[-1], file=sys.stderr)
                continue
            nll = "-" if m["nll"] is None else f"{m['nll']:.3f}"
            lines.append(f"{head:>17} lr {lr:<5} top10 {m['top10']:.4f} top1 {m['top1']:.4f} nll {nll}")
            print(lines[-1], file=sys.stderr)
            if best is None or m["top10"] > best[1]:
                best = (lr, m["top10"])
        lines.append(f"{head:>17} chosen lr {best[0] if best else None}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
