"""Next-word language model on real text: one n-gram MLP body, several output layers over D words, same budget.

    python -m sparsetarget.examples.lm --corpus /usr/share/dictd/gcide.dict.dz --vocab-size 100000 \\
        --heads spherical_softmax,taylor_softmax,z_loss,softmax,dense_spherical,adaptive_softmax,sampled_softmax \\
        --budget-s 300 --out runs/lm

The body (as in Vincent et al. 2015): the ``--context`` previous words -> embeddings (``--embed``) -> a tanh hidden
layer (``--hidden``) -> h of size d (``--dim``, tanh) -> output layer of size D = vocabulary + ``<unk>``. Every head
starts from the same body weights, sees the same batches in the same order, and gets the same training
wall-clock (its own clock: evaluation is not counted), in round-robin slices so that load on a shared machine
hits all heads alike. Heads:

- ``spherical_softmax``, ``taylor_softmax``, ``z_loss``: :class:`sparsetarget.torch.FactoredLinear`, exact
  factored SGD in O(d^2) per example;
- ``softmax``: ``nn.Linear`` + ``F.cross_entropy`` over the D logits, SGD;
- ``dense_spherical``: ``nn.Linear`` + the spherical softmax loss computed on the D outputs, SGD: the same
  numbers per step as ``spherical_softmax`` (same initial weights), at the dense cost;
- ``adaptive_softmax``: ``nn.AdaptiveLogSoftmaxWithLoss`` (cutoffs D/50, D/10, D/2 over frequency-sorted ids);
- ``sampled_softmax``: ``--samples`` negatives per batch from a log-uniform (Zipf) sampler over the
  frequency-sorted ids, logits corrected by -log(expected count), accidental hits removed; sparse updates.

Held-out metrics on a fixed sample of validation positions (the same for all heads): NLL per word where the head
defines a normalised distribution (factored spherical/Taylor heads exactly in O(d^2) via ``log_prob``; Z-loss
defines none), top-1 / top-10 accuracy ranked over all D words by each head's own probability. Writes
``OUT/results.json``, ``OUT/results.png`` and resumable checkpoints ``OUT/<head>.pt``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import sparsetarget.torch as stt

from .. import data
from . import _common as common

HEADS = ("spherical_softmax", "taylor_softmax", "z_loss", "softmax", "dense_spherical", "adaptive_softmax",
         "sampled_softmax")
FACTORED = {"spherical_softmax", "taylor_softmax", "z_loss"}
# Head learning rates: the best held-out top-10 of a grid in short pilots on GCIDE at D = 20k, d = 128, batch 128
# (benchmarks/lm_lr_pilot.py, benchmarks/results/lm_lr_pilot*.txt); dense_spherical takes spherical_softmax's.
DEFAULT_LR = {"spherical_softmax": 1.0, "taylor_softmax": 3.0, "z_loss": 3.0, "softmax": 1.0,
              "dense_spherical": 1.0, "adaptive_softmax": 3.0, "sampled_softmax": 1.0}


class Body(nn.Module):
    """Context words -> embeddings -> tanh hidden layer -> tanh h of size ``dim``."""

    def __init__(self, num_words: int, context: int, embed: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_words + 1, embed, sparse=True)  # the last id pads before a document
        self.hidden = nn.Linear(context * embed, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x).flatten(1)
        return torch.tanh(self.out(torch.tanh(self.hidden(e))))


def dense_spherical_loss(o: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean spherical softmax loss -log((o_y^2 + eps) / (||o||^2 + D eps)) from the D outputs."""
    oy = o.gather(1, y[:, None]).squeeze(1)
    return (torch.log((o * o).sum(1) + o.shape[1] * eps) - torch.log(oy * oy + eps)).mean()


def dense_spherical_log_prob(o: torch.Tensor, eps: float) -> torch.Tensor:
    """log p of every output under spherical softmax, (m, D)."""
    p = o * o + eps
    return torch.log(p) - torch.log(p.sum(1, keepdim=True))


class Batches:
    """Batch ``step`` of the shared data order: epoch e is a permutation seeded by seed + e of the training
    positions, cut into batches (the last partial batch of an epoch is dropped). Deterministic from ``step``, so
    every head and every resumed run sees the same batches."""

    def __init__(self, corpus: data.EncodedCorpus, context: int, batch: int, pad_id: int, seed: int) -> None:
        if len(corpus) < batch:
            raise SystemExit(f"--batch {batch} is larger than the training text ({len(corpus)} tokens)")
        self.corpus, self.context, self.batch, self.pad_id, self.seed = corpus, context, batch, pad_id, seed
        self.per_epoch = len(corpus) // batch
        self._orders: dict[int, np.ndarray] = {}

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, j = divmod(step, self.per_epoch)
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng(self.seed + epoch).permutation(len(self.corpus))
        pos = self._orders[epoch][j * self.batch:(j + 1) * self.batch]
        X = data.ngram_contexts(self.corpus, pos, self.context, self.pad_id)
        return torch.from_numpy(X), torch.from_numpy(self.corpus.ids[pos].astype(np.int64))


class LMTrainer(common.Trainer):
    """Body + one output layer of kind ``name``."""

    def __init__(self, name: str, args: argparse.Namespace, num_words: int, batches: Batches,
                 eval_x: torch.Tensor, eval_y: torch.Tensor, lr: float, log_unigram: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.name, self.batches, self.eval_x, self.eval_y = name, batches, eval_x, eval_y
        self.eps, self.D, self.samples = args.eps, num_words, args.samples
        torch.manual_seed(args.seed)
        self.body = Body(num_words, args.context, args.embed, args.hidden, args.dim)
        gen = torch.Generator().manual_seed(args.seed + 1)
        bound = 1 / math.sqrt(args.dim)
        init_w = torch.empty(num_words, args.dim).uniform_(-bound, bound, generator=gen)
        init_b = torch.empty(num_words).uniform_(-bound, bound, generator=gen)
        self.sampler = torch.Generator().manual_seed(args.seed + 2)
        params: list[nn.Parameter] = list(self.body.parameters())
        n_body = len(params)
        self.head: nn.Module
        self.head_opt: torch.optim.Optimizer | None = None
        if name in FACTORED:
            self.head = stt.FactoredLinear(args.dim, num_words, bias=True, weight=init_w, initial_bias=init_b,
                                           dtype=dtype)
            self.head_opt = stt.FactoredSGD(self.head, lr=lr)
        elif name in ("softmax", "dense_spherical"):
            self.head = nn.Linear(args.dim, num_words)
            with torch.no_grad():
                self.head.weight.copy_(init_w)
                self.head.bias.copy_(init_b)
            params += list(self.head.parameters())
        elif name == "adaptive_softmax":
            cutoffs = sorted({c for c in (num_words // 50, num_words // 10, num_words // 2) if 0 < c < num_words})
            self.head = nn.AdaptiveLogSoftmaxWithLoss(args.dim, num_words, cutoffs, div_value=4.0, head_bias=True)
            params += list(self.head.parameters())
        elif name == "sampled_softmax":
            self.head = nn.Embedding(num_words, args.dim + 1, sparse=True)  # weight row and bias of each word
            with torch.no_grad():
                self.head.weight[:, :-1].copy_(init_w)
                self.head.weight[:, -1].copy_(init_b)
            params += list(self.head.parameters())
            # log-uniform (Zipf) proposal over frequency-sorted ids: P(k) = log((k + 2) / (k + 1)) / log(D + 1)
            k = torch.arange(num_words, dtype=torch.float64)
            self.log_q = (torch.log(torch.log((k + 2) / (k + 1))) - math.log(math.log(num_words + 1))).float()
        else:
            raise ValueError(f"unknown head {name!r}")
        self.body.to(dtype)
        if name not in FACTORED:
            self.head.to(dtype)
        self.opt = torch.optim.SGD([{"params": params[:n_body], "lr": args.body_lr},
                                    {"params": params[n_body:], "lr": lr}])
        self.log_unigram = log_unigram

    # ------------------------------------------------------------------ training
    def loss(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        name = self.name
        if name in FACTORED:
            opts = {"eps": self.eps} if name == "spherical_softmax" else {}
            return stt.linear_spherical_loss(h, self.head, y, loss=name, **opts)
        if name == "softmax":
            return F.cross_entropy(self.head(h), y)
        if name == "dense_spherical":
            return dense_spherical_loss(self.head(h), y, self.eps)
        if name == "adaptive_softmax":
            return self.head(h, y).loss
        # sampled softmax
        u = torch.rand(self.samples, generator=self.sampler, dtype=torch.float64)
        neg = (torch.exp(u * math.log(self.D + 1)) - 1).long().clamp_(0, self.D - 1)
        ids = torch.cat([y, neg])
        rows = self.head(ids)
        w, b = rows[:, :-1], rows[:, -1]
        log_count = self.log_q[ids] + math.log(self.samples)
        true_logit = (h * w[:len(y)]).sum(1) + b[:len(y)] - log_count[:len(y)]
        neg_logit = h @ w[len(y):].T + b[len(y):] - log_count[len(y):]
        neg_logit = neg_logit.masked_fill(neg[None, :] == y[:, None], float("-inf"))
        logits = torch.cat([true_logit[:, None], neg_logit], 1)
        return F.cross_entropy(logits, torch.zeros_like(y))

    def train_step(self, step: int) -> float:
        x, y = self.batches(step)
        return self.optimize(self.loss(self.body(x), y))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def full_log_prob(self, h: torch.Tensor) -> torch.Tensor | None:
        """log p over all D words for the dense and approximate heads (None for factored heads)."""
        name = self.name
        if name == "softmax":
            return F.log_softmax(self.head(h), 1)
        if name == "dense_spherical":
            return dense_spherical_log_prob(self.head(h), self.eps)
        if name == "adaptive_softmax":
            return self.head.log_prob(h)
        if name == "sampled_softmax":
            w = self.head.weight
            return F.log_softmax(h @ w[:, :-1].T + w[:, -1], 1)
        return None

    @torch.no_grad()
    def evaluate(self, tile: int = 250) -> dict[str, Any]:
        self.body.eval()
        nll, top1, top10 = [], [], []
        for i in range(0, len(self.eval_y), tile):
            x, y = self.eval_x[i:i + tile], self.eval_y[i:i + tile]
            h = self.body(x)
            if self.name in FACTORED:
                if self.name == "z_loss":
                    idx = self.head.topk(h, 10).indices
                else:
                    idx = self.head.topk(h, 10, by="probability", kind=self.name, eps=self.eps).indices
                    nll.append(-self.head.log_prob(h, y, self.name, eps=self.eps).double())
            else:
                lp = self.full_log_prob(h)
                assert lp is not None
                idx = lp.topk(10, 1).indices
                nll.append(-lp.gather(1, y[:, None]).squeeze(1).double())
            top1.append((idx[:, 0] == y).double())
            top10.append((idx == y[:, None]).any(1).double())
        self.body.train()
        return {"nll": float(torch.cat(nll).mean()) if nll else None, "top1": float(torch.cat(top1).mean()),
                "top10": float(torch.cat(top10).mean())}

    @torch.no_grad()
    def check_log_prob(self, rows: int = 64) -> float | None:
        """Max |log p(target)| difference between the factored ``log_prob`` and a dense float64 computation
        from all D outputs (None for heads without it)."""
        if self.name not in ("spherical_softmax", "taylor_softmax"):
            return None
        x, y = self.eval_x[:rows], self.eval_y[:rows]
        h = self.body(x)
        fast = self.head.log_prob(h, y, self.name, eps=self.eps).double()
        o = self.head.logits(h).double()
        p = o * o + self.eps if self.name == "spherical_softmax" else 1 + o + 0.5 * o * o
        dense = (torch.log(p) - torch.log(p.sum(1, keepdim=True))).gather(1, y[:, None]).squeeze(1)
        return float((fast - dense).abs().max())

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict[str, Any]:
        return {"sampler": self.sampler.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.sampler.set_state(state["sampler"])


def exactness_float64(args: argparse.Namespace, D: int, batches: Batches, eval_x: torch.Tensor,
                      eval_y: torch.Tensor, lr: float, log_unigram: torch.Tensor, steps: int = 30) -> dict[str, Any]:
    """Train ``spherical_softmax`` and ``dense_spherical`` in float64 from the same weights on the same batches
    for ``steps`` steps; the largest difference of their losses and of their bodies' outputs afterwards."""
    pair = [LMTrainer(n, args, D, batches, eval_x, eval_y, lr, log_unigram, dtype=torch.float64)
            for n in ("spherical_softmax", "dense_spherical")]
    losses = [[tr.train_step(i) for i in range(steps)] for tr in pair]
    with torch.no_grad():
        h = [tr.body(eval_x[:256]) for tr in pair]
    return {"dtype": "float64", "steps": steps,
            "max_abs_loss_diff": max(abs(a - b) for a, b in zip(*losses)),
            "max_abs_body_output_diff": float((h[0] - h[1]).abs().max())}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sparsetarget.examples.lm", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus", required=True, help="text: a file, a directory, or a gzip/dictzip file")
    p.add_argument("--vocab-size", type=int, default=100_000, help="D - 1: most frequent words kept (+ <unk>)")
    common.add_shared_arguments(p, HEADS, budget_s=300.0, slices=6, embed=64, dim=128)
    p.add_argument("--context", type=int, default=4, help="previous words seen by the model")
    p.add_argument("--hidden", type=int, default=256, help="hidden layer size")
    p.add_argument("--samples", type=int, default=1024, help="negatives per batch of sampled softmax")
    p.add_argument("--eval-words", type=int, default=2000, help="held-out positions evaluated (fixed sample)")
    p.add_argument("--max-docs", type=int, default=0, help="read only the first N documents (0: all)")
    args = p.parse_args(argv)
    common.check_positive(p, args, ("vocab_size", "slices", "context", "embed", "hidden", "dim", "batch", "samples",
                             "eval_words"))
    return args


def load_data(args: argparse.Namespace) -> tuple[data.Vocabulary, data.EncodedCorpus, data.EncodedCorpus]:
    """Vocabulary from the training documents, then the encoded training and validation text."""
    if args.max_docs:
        src = args.corpus

        def docs() -> Any:
            for i, doc in enumerate(data.iter_documents(src)):
                if i >= args.max_docs:
                    return
                yield doc
    else:
        def docs() -> Any:
            return data.iter_documents(args.corpus)
    t0 = time.perf_counter()
    fr = (0.9, 0.05, 0.05)

    def tokens(split: str) -> Any:
        for i, doc in enumerate(docs()):
            if i % 20000 == 0:  # a progress line: the number of documents is unknown until the end
                print(f"\rreading {split} documents: {i}", end="", file=sys.stderr, flush=True)
            if data.split_of(i, fr, args.seed) == split:
                yield data.tokenize(doc)
        print(f"\rreading {split} documents: done", file=sys.stderr, flush=True)

    vocab = data.Vocabulary.build(tokens("train"), args.vocab_size)

    def encode(split: str) -> data.EncodedCorpus:
        ids, starts, total = [], [], 0
        for toks in tokens(split):
            if toks:
                starts.append(total)
                ids.append(vocab.encode(toks))
                total += len(toks)
        if not ids:
            raise SystemExit(f"--corpus: no {split} text in {args.corpus!r}")
        return data.EncodedCorpus(np.concatenate(ids), np.asarray(starts, dtype=np.int64))

    train, valid = encode("train"), encode("valid")
    print(f"corpus {args.corpus}: {len(train)} training and {len(valid)} validation tokens, vocabulary "
          f"{len(vocab)} (<unk> {vocab.counts[0] / max(int(vocab.counts.sum()), 1):.1%} of training tokens), "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return vocab, train, valid


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison; returns what it writes to ``OUT/results.json``."""
    args = parse_args(argv)
    heads, lrs = common.setup_run(args, HEADS, DEFAULT_LR)
    vocab, train, valid = load_data(args)
    D = len(vocab)
    pad = D
    batches = Batches(train, args.context, args.batch, pad, args.seed)
    rng = np.random.default_rng(args.seed + 3)
    pos = np.sort(rng.choice(len(valid), size=min(args.eval_words, len(valid)), replace=False))
    eval_x = torch.from_numpy(data.ngram_contexts(valid, pos, args.context, pad))
    eval_y = torch.from_numpy(valid.ids[pos].astype(np.int64))
    counts = torch.from_numpy(np.maximum(vocab.counts, 1)).double()
    log_unigram = torch.log(counts / counts.sum()).float()
    trainers = [LMTrainer(h, args, D, batches, eval_x, eval_y, lrs[h], log_unigram) for h in heads]
    if not args.no_resume:
        common.resume(trainers, args.out)
    unigram_nll = float(-log_unigram[eval_y].double().mean())
    config = {k: v for k, v in vars(args).items() if k not in ("lr",)}
    config.update(lr={h: lrs[h] for h in heads}, training_tokens=len(train), validation_tokens=len(valid),
                  eval_positions=len(eval_y))
    results: dict[str, Any] = {"load_average_at_start": os.getloadavg(),
                               "task": "next-word language model", "corpus": os.path.basename(args.corpus),
                               "vocab_size": D, "machine": common.machine(), "config": config,
                               "unigram_nll": unigram_nll, "heads": {}}

    def write() -> None:
        for tr in trainers:
            if not tr.curve:
                continue
            last = tr.curve[-1]
            results["heads"][tr.name] = {
                "final": {"nll": last["nll"], "top1": last["top1"], "top10": last["top10"],
                          "tokens_per_s": tr.steps * args.batch / max(tr.wall_s, 1e-9), "wall_s": tr.wall_s,
                          "steps": tr.steps, "state_mib": tr.state_mib(), "step_peak_mib": tr.step_peak_mib},
                "curve": tr.curve, "failed": tr.failed or None, "train_loss": tr.train_loss,
                "first_losses": tr.first_losses}
            if tr.name in FACTORED:
                diag = tr.head.diagnostics()
                results["heads"][tr.name]["final"]["factorisation"] = {
                    k: diag[k] for k in ("condition", "corrections", "refreshes")}
        by = {tr.name: tr for tr in trainers}
        if "spherical_softmax" in by and "dense_spherical" in by:
            a, b = by["spherical_softmax"].first_losses, by["dense_spherical"].first_losses
            n = min(len(a), len(b))
            if n:
                diffs = [abs(x - y) for x, y in zip(a[:n], b[:n])]
                results["exactness"] = {
                    "steps": n, "max_abs_loss_diff": max(diffs), "max_abs_loss_diff_first_20": max(diffs[:20]),
                    "loss_diff": diffs,
                    "note": "spherical_softmax (factored) vs dense_spherical (nn.Linear + the same loss + SGD), "
                            "same initial weights and batches"}
        common.write_json(os.path.join(args.out, "results.json"), results)

    if "spherical_softmax" in heads and "dense_spherical" in heads:
        results["exactness_float64"] = exactness_float64(args, D, batches, eval_x, eval_y, lrs["spherical_softmax"],
                                                         log_unigram)
        ex = results["exactness_float64"]
        print(f"exactness (float64, {ex['steps']} steps from the same weights): max |loss difference| = "
              f"{ex['max_abs_loss_diff']:.3g}, max |h difference| = {ex['max_abs_body_output_diff']:.3g}",
              file=sys.stderr)
    common.round_robin(trainers, args.budget_s, args.slices, args.out, on_point=write)
    checks = {tr.name: tr.check_log_prob() for tr in trainers}
    results["log_prob_check"] = {k: v for k, v in checks.items() if v is not None}
    for name, diff in results["log_prob_check"].items():
        print(f"{name}: log_prob vs dense float64 over all D outputs, max |diff| = {diff:.3g}", file=sys.stderr)
    results["load_average_at_end"] = os.getloadavg()
    write()
    if "exactness" in results:
        ex = results["exactness"]
        print(f"float32 training runs: max |loss(spherical_softmax) - loss(dense_spherical)| over the first 20 "
              f"steps = {ex['max_abs_loss_diff_first_20']:.3g}, over {ex['steps']} steps = "
              f"{ex['max_abs_loss_diff']:.3g}", file=sys.stderr)
    plot(results, os.path.join(args.out, "results.png"))
    print_table(results)
    return results


def plot(results: dict[str, Any], path: str) -> None:
    """Held-out NLL, top-10 and top-1 against training wall-clock, and the training loss of the factored and
    dense spherical heads against steps."""
    def extra(ax: Any) -> None:
        pair = [results["heads"].get(name) for name in ("spherical_softmax", "dense_spherical")]
        last = min((h["final"]["steps"] for h in pair if h), default=0)  # the steps both heads made
        for name, head in zip(("spherical_softmax", "dense_spherical"), pair):
            if head and head["train_loss"]:
                pts = [p for p in head["train_loss"] if p["step"] <= last]
                ax.plot([p["step"] for p in pts], [p["loss"] for p in pts], label=name,
                        linestyle="--" if name == "dense_spherical" else "-")
        ex, ex64 = results.get("exactness"), results.get("exactness_float64")
        title = "same loss per step"
        if ex:
            title += f"\nfloat32: max |diff| first 20 steps {ex['max_abs_loss_diff_first_20']:.1e}"
        if ex64:
            title += f"\nfloat64: max |diff| first {ex64['steps']} steps {ex64['max_abs_loss_diff']:.1e}"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (50-step mean)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)

    common.plot_curves(results, [("nll", "held-out NLL per word"), ("top10", "held-out top-10 accuracy"),
                          ("top1", "held-out top-1 accuracy")], path,
                f"{results['task']}, {results['corpus']}, D = {results['vocab_size']}\n{results['machine']}", extra)


def print_table(results: dict[str, Any]) -> None:
    """The final numbers, one row per head."""
    print(f"{'head':>17} {'steps':>8} {'tokens/s':>9} {'NLL':>7} {'ppl':>9} {'top1':>6} {'top10':>6}")
    for name, head in results["heads"].items():
        f = head["final"]
        nll = "-" if f["nll"] is None else f"{f['nll']:.3f}"
        ppl = "-" if f["nll"] is None else f"{math.exp(min(f['nll'], 700)):.1f}"
        print(f"{name:>17} {f['steps']:>8} {f['tokens_per_s']:>9.0f} {nll:>7} {ppl:>9} {f['top1']:>6.3f} "
              f"{f['top10']:>6.3f}")


if __name__ == "__main__":
    main()
