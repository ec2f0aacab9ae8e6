"""End-to-end demo: next-word prediction over the words of Python's own standard library sources.

    python -m sparsetarget.demo [--steps 400] [--vocab 50000] [--hidden 256] [--batch 128] [--check-steps 10]

Builds a corpus from the .py files shipped with this Python (real text, no download), gives each position a fixed
random context feature h (previous words), trains a spherical-family output layer over the whole vocabulary with
exact factored SGD and reports held-out log-likelihood and top-10 accuracy before and after. It checks exactness
by running the first --check-steps steps again from the same initial weights on the same minibatches with dense SGD
on the full D x d matrix, in float64 and in float32, and printing how far the factored weights are from the float64
dense ones next to how far float32 dense SGD is; the float32 dense steps give the speed-up.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import sysconfig
import time

import numpy as np

from . import FactoredOutput, get_num_threads

WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|[^\sA-Za-z0-9_]")


def load_corpus(max_tokens: int) -> list[str]:
    """Tokens of the standard library's .py files, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    tokens: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idlelib"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                try:
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        tokens += WORD.findall(f.read())
                except (UnicodeDecodeError, OSError):
                    continue
            if len(tokens) >= max_tokens:
                return tokens[:max_tokens]
    return tokens


def progress(i: int, total: int, text: str, width: int = 30) -> None:
    done = int(width * i / total)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{total} {text}")
    if i == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def dense_step(W: np.ndarray, H: np.ndarray, y: np.ndarray, lr: float) -> np.ndarray:
    """The same Taylor-softmax SGD step on a dense W, in W's dtype (O(m D d)); returns the per-example losses."""
    H = H.astype(W.dtype)
    O = H @ W.T
    num = 1 + O + 0.5 * O * O
    Z = num.sum(1, keepdims=True)
    rows = np.arange(H.shape[0])
    losses = np.log(Z[:, 0]) - np.log(num[rows, y])
    dO = (1 + O) / Z
    dO[rows, y] -= (1 + O[rows, y]) / num[rows, y]
    W -= W.dtype.type(lr) * (dO.T @ H)
    return losses


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    return float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sparsetarget.demo", description=__doc__,
                                 formatter_class=_HelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="training steps of the factored layer")
    ap.add_argument("--vocab", type=int, default=50000,
                    help="output classes D: at most this many most frequent words, plus <unk>")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size d")
    ap.add_argument("--batch", type=int, default=128, help="minibatch size m")
    ap.add_argument("--lr", type=float, default=30.0, help="learning rate per minibatch (divided by m)")
    ap.add_argument("--tokens", type=int, default=2_000_000, help="corpus size cap, in tokens")
    ap.add_argument("--check-steps", type=int, default=10,
                    help="steps repeated with dense SGD to check exactness and time the dense layer (>= 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the features, the initial weights and the batches")
    args = ap.parse_args(argv)
    for name in ("steps", "vocab", "hidden", "batch", "tokens", "check_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    rng = np.random.default_rng(args.seed)

    t0 = time.perf_counter()
    tokens = load_corpus(args.tokens)
    counts = collections.Counter(tokens)
    vocab = ["<unk>"] + [w for w, _ in counts.most_common(args.vocab - 1)]
    index = {w: i for i, w in enumerate(vocab)}
    ids = np.fromiter((index.get(w, 0) for w in tokens), dtype=np.int64, count=len(tokens))
    D, d, m = len(vocab), args.hidden, args.batch
    print(f"corpus: {len(tokens):,} tokens of Python's standard library, vocabulary D = {D:,} "
          f"({100 * np.mean(ids > 0):.1f}% of tokens in vocabulary), read in {time.perf_counter() - t0:.1f} s")

    # Fixed random context features: h_t = normalise(E1[w_{t-1}] + E2[w_{t-2}] / 2).
    E1 = rng.standard_normal((D, d)).astype(np.float32)
    E2 = rng.standard_normal((D, d)).astype(np.float32)

    def features(pos: np.ndarray) -> np.ndarray:
        H = E1[ids[pos - 1]] + 0.5 * E2[ids[pos - 2]]
        return H / np.linalg.norm(H, axis=1, keepdims=True)

    split = int(0.9 * len(ids))
    test_pos = rng.integers(2, len(ids) - split, 2048) + split
    H_test, y_test = features(test_pos), ids[test_pos]

    def new_layer() -> FactoredOutput:
        return FactoredOutput.random(D, d, dtype=np.float32, seed=args.seed, loss="taylor_softmax", scale=1e-3)

    layer = new_layer()

    def evaluate() -> tuple[float, float]:
        nll = -float(np.mean(layer.log_prob(H_test, y_test)))
        _, top = layer.topk(H_test[:512], 10)
        return nll, float(np.mean(np.any(top == y_test[:512, None], axis=1)))

    nll0, acc0 = evaluate()
    print(f"before training: held-out NLL {nll0:.3f} nats (uniform: {np.log(D):.3f}), top-10 accuracy {acc0:.1%}")
    step_times, curve = [], []
    for i in range(1, args.steps + 1):
        pos = rng.integers(2, split, m)
        H, y = features(pos), ids[pos]
        t = time.perf_counter()
        losses, _ = layer.step(H, y, args.lr / m)
        step_times.append(time.perf_counter() - t)
        curve.append(float(losses.mean()))
        if i % 10 == 0 or i == args.steps:
            progress(i, args.steps, f"train loss {np.mean(curve[-10:]):.3f}")
    nll1, acc1 = evaluate()
    q = max(1, args.steps // 5)
    print("training loss by fifth of the run: " + "  ".join(f"{np.mean(curve[k:k + q]):.3f}"
                                                           for k in range(0, len(curve), q)))
    print(f"after {args.steps} steps: held-out NLL {nll1:.3f} nats, top-10 accuracy {acc1:.1%}")
    diag = layer.diagnostics()
    print(f"factorisation: condition of U {diag['condition']:.2f}, ||U U^-1 - I|| {diag['inverse_error']:.1e}, "
          f"{diag['corrections']} corrections")

    # Exactness: the first steps again, from the same initial weights on the same minibatches, factored and dense.
    check_rng = np.random.default_rng(args.seed + 1)
    batches = [check_rng.integers(2, split, m) for _ in range(args.check_steps)]
    factored = new_layer()
    W64 = factored.dense_weight().astype(np.float64)
    W32 = W64.astype(np.float32)
    loss_diff, dense_times = 0.0, []
    for pos in batches:
        H, y = features(pos), ids[pos]
        losses, _ = factored.step(H, y, args.lr / m)
        losses64 = dense_step(W64, H, y, args.lr / m)
        loss_diff = max(loss_diff, float(np.max(np.abs(losses - losses64))))
    for pos in batches:  # timed on their own, like the factored steps
        H, y = features(pos), ids[pos]
        t = time.perf_counter()
        dense_step(W32, H, y, args.lr / m)
        dense_times.append(time.perf_counter() - t)
    err_factored = relative_difference(factored.dense_weight(), W64)
    err_dense32 = relative_difference(W32, W64)
    moved = relative_difference(new_layer().dense_weight(), W64)
    tolerance = 100 * float(np.finfo(np.float32).eps)
    exact = err_factored < tolerance
    print(f"exactness: the first {args.check_steps} steps again, from the same initial weights on the same "
          f"minibatches, against dense float64 SGD on the full {D:,} x {d} W (max |dW| / max |W|; these steps "
          f"moved W by {moved:.1e}):\n"
          f"  factored layer (float32): weights differ by {err_factored:.1e}, losses by at most {loss_diff:.1e}\n"
          f"  dense SGD in float32:     weights differ by {err_dense32:.1e}\n"
          + (f"  -> the factored steps are dense SGD up to float32 rounding (weights within 100 float32 epsilons = "
             f"{tolerance:.1e})" if exact else
             f"  -> NOT exact: the factored weights differ by more than 100 float32 epsilons = {tolerance:.1e}"))
    # medians; the first dense step (page faults, BLAS warm-up) is left out when there are others
    fact_ms, dense_ms = 1e3 * float(np.median(step_times)), 1e3 * float(np.median(dense_times[1:] or dense_times))
    print(f"step time (D={D:,}, d={d}, m={m}, {get_num_threads()} BLAS threads): factored {fact_ms:.2f} ms, dense "
          f"float32 {dense_ms:.1f} ms -> {dense_ms / fact_ms:.0f}x faster")
    if not exact:
        sys.exit(1)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows the defaults and keeps the description's line breaks."""


if __name__ == "__main__":
    main()
