"""Reverse dictionary (definition -> word), an extreme multi-label task with K-sparse targets carrying values.

    python -m sparsetarget.examples.reverse_dictionary --gcide /usr/share/dictd/gcide.dict.dz \\
        --wordnet /usr/share/wordnet --heads squared_error,spherical_softmax,softmax,bce --budget-s 240 --out runs/rd

The task of Hill, Cho, Korhonen & Bengio (TACL 2016): read a definition, name the word. Examples are GCIDE senses
(target: the headword) and WordNet 3.0 synsets (targets: every single-word lemma of the synset, values 1/k, summing
to 1). D = every target word of both dictionaries. A fixed sample of WordNet glosses (``--test-glosses``) is held
out; GCIDE senses of the same words that nearly repeat a held-out gloss (GCIDE includes WordNet 1.5 glosses; token
Jaccard >= 0.5) are removed from training. Words of an example's own targets are removed from its input.

Body: bag of word embeddings (mean, ``--embed``) -> tanh layer of size d (``--dim``). Heads, same body weights,
batches and training wall-clock (round-robin slices, evaluation not counted):

- ``squared_error``, ``spherical_softmax``: :class:`sparsetarget.torch.FactoredLinear` with CSR targets and values,
  exact factored SGD in O(d^2) per example (+ O(d) per target);
- ``softmax``: ``nn.Linear`` + cross-entropy with the soft targets, SGD;
- ``bce``: ``nn.Linear`` + binary cross-entropy on all D outputs (multi-hot targets, summed over D, bias
  initialised at -log D), SGD.

Metrics on the held-out glosses over all D words, ranked by each head's own score (spherical softmax: its
probability, i.e. |o|): accuracy@1/10/100 (a target among the top k), median rank of the best-ranked target, P@1,
P@5; also on the "seen" subset (a target word has training definitions). Writes ``OUT/results.json``,
``OUT/results.png`` and checkpoints ``OUT/<head>.pt``.
"""

from __future__ import annotations

import argparse
import collections
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

HEADS = ("squared_error", "spherical_softmax", "softmax", "bce")
FACTORED = {"squared_error", "spherical_softmax"}
# Head learning rates from 15-second pilots of the factored heads at full size (squared error: above ~0.01 the
# update factor can become singular as the tanh body saturates); softmax and BCE take the language model pilot's
# softmax rate (benchmarks/results/lm_lr_pilot*.txt): their pilots would get ~30 steps.
DEFAULT_LR = {"squared_error": 0.005, "spherical_softmax": 1.0, "softmax": 1.0, "bce": 1.0}


class Examples:
    """A multi-label data set: inputs (indptr, ids) bags of words, targets CSR (indptr, indices, values)."""

    def __init__(self, bags: list[np.ndarray], targets: list[list[int]], num_targets: int) -> None:
        self.x_ptr = np.zeros(len(bags) + 1, dtype=np.int64)
        self.x_ptr[1:] = np.cumsum([len(b) for b in bags])
        self.x_ids = np.concatenate(bags).astype(np.int64) if bags else np.zeros(0, dtype=np.int64)
        self.y = data.to_csr(targets, num_targets, normalize=True)

    def __len__(self) -> int:
        return len(self.x_ptr) - 1

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        ptr, ids, _ = data.csr_rows(self.x_ptr, self.x_ids, np.ones(len(self.x_ids), np.float32), rows)
        y = data.csr_rows(*self.y, rows)
        return (torch.from_numpy(ids), torch.from_numpy(ptr[:-1]),
                (torch.from_numpy(y[0]), torch.from_numpy(y[1]), torch.from_numpy(y[2])))


def load(args: argparse.Namespace) -> tuple[list[str], data.Vocabulary, Examples, Examples, dict[str, Any]]:
    """Targets, input vocabulary, training and test examples, and counts describing them."""
    t0 = time.perf_counter()
    gcide = list(data.read_gcide(args.gcide))
    wordnet = list(data.read_wordnet_glosses(args.wordnet))
    if args.max_examples:
        gcide, wordnet = gcide[:args.max_examples], wordnet[:args.max_examples]
    if len(wordnet) <= args.test_glosses:
        raise SystemExit(f"--test-glosses {args.test_glosses}: only {len(wordnet)} WordNet glosses were read")
    rng = np.random.default_rng(args.seed)
    test_idx = set(rng.choice(len(wordnet), size=args.test_glosses, replace=False).tolist())
    counts: collections.Counter[str] = collections.Counter()
    for head, _ in gcide:
        counts[head] += 1
    for lemmas, _ in wordnet:
        counts.update(lemmas)
    words = sorted(counts, key=lambda w: (-counts[w], w))
    index = {w: i for i, w in enumerate(words)}
    test_sets: dict[str, list[set[str]]] = collections.defaultdict(list)
    for i in test_idx:
        lemmas, definition = wordnet[i]
        for lemma in lemmas:
            test_sets[lemma].append(set(data.tokenize(definition)))

    def near_test(head: str, toks: list[str]) -> bool:
        s = set(toks)
        return any(len(s & t) >= 0.5 * len(s | t) for t in test_sets.get(head, ()))

    train_raw: list[tuple[list[str], list[str]]] = []
    dropped = 0
    for head, definition in gcide:
        toks = data.tokenize(definition)
        if near_test(head, toks):
            dropped += 1
            continue
        train_raw.append(([head], toks))
    test_raw = []
    for i, (lemmas, definition) in enumerate(wordnet):
        (test_raw if i in test_idx else train_raw).append((lemmas, data.tokenize(definition)))
    vocab = data.Vocabulary.build((toks for _, toks in train_raw), args.input_vocab)

    def examples(raw: list[tuple[list[str], list[str]]]) -> Examples:
        bags, targets = [], []
        for lemmas, toks in raw:
            own = set(lemmas)
            ids = vocab.encode(t for t in toks if t not in own)
            if len(ids) == 0:
                ids = np.zeros(1, dtype=np.int32)  # an empty definition reads as <unk>
            bags.append(ids)
            targets.append([index[w] for w in lemmas])
        return Examples(bags, targets, len(words))

    train, test = examples(train_raw), examples(test_raw)
    seen_words = {w for lemmas, _ in train_raw for w in lemmas}
    seen = np.array([any(w in seen_words for w in lemmas) for lemmas, _ in test_raw])
    info = {"gcide_senses": len(gcide), "wordnet_glosses": len(wordnet), "gcide_dropped_near_test": dropped,
            "train_examples": len(train), "test_examples": len(test), "test_seen": int(seen.sum()),
            "input_vocab": len(vocab), "seen_mask": seen}
    print(f"reverse dictionary: D = {len(words)} target words, {len(train)} training definitions "
          f"({len(gcide) - dropped} GCIDE senses, {len(wordnet) - len(test_idx)} WordNet glosses; {dropped} GCIDE "
          f"senses near a test gloss dropped), {len(test)} test glosses ({int(seen.sum())} with a seen target), "
          f"input vocabulary {len(vocab)}, {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return words, vocab, train, test, info


class Body(nn.Module):
    """Mean of the definition's word embeddings -> tanh layer of size ``dim``."""

    def __init__(self, num_words: int, embed: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(num_words, embed, mode="mean", sparse=True)
        self.out = nn.Linear(embed, dim)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.out(self.embed(ids, offsets)))


class RDTrainer(common.Trainer):
    """Body + one output layer of kind ``name``, trained on multi-label CSR targets."""

    def __init__(self, name: str, args: argparse.Namespace, D: int, input_vocab: int, train: Examples,
                 test: Examples, seen: np.ndarray, lr: float) -> None:
        super().__init__()
        self.name, self.train, self.test, self.seen, self.D = name, train, test, seen, D
        self.batch, self.seed, self.eps = args.batch, args.seed, args.eps
        torch.manual_seed(args.seed)
        self.body = Body(input_vocab, args.embed, args.dim)
        gen = torch.Generator().manual_seed(args.seed + 1)
        bound = 1 / math.sqrt(args.dim)
        init_w = torch.empty(D, args.dim).uniform_(-bound, bound, generator=gen)
        init_b = torch.empty(D).uniform_(-bound, bound, generator=gen)
        params = list(self.body.parameters())
        n_body = len(params)
        self.head: nn.Module
        self.head_opt: torch.optim.Optimizer | None = None
        if name in FACTORED:
            self.head = stt.FactoredLinear(args.dim, D, bias=True, weight=init_w, initial_bias=init_b)
            self.head_opt = stt.FactoredSGD(self.head, lr=lr)
        else:
            self.head = nn.Linear(args.dim, D)
            with torch.no_grad():
                self.head.weight.copy_(init_w)
                self.head.bias.copy_(init_b if name == "softmax" else torch.full((D,), -math.log(D)))
            params += list(self.head.parameters())
        self.opt = torch.optim.SGD([{"params": params[:n_body], "lr": args.body_lr},
                                    {"params": params[n_body:], "lr": lr}])
        self.per_epoch = max(len(train) // self.batch, 1)
        self._order: tuple[int, np.ndarray] | None = None

    def rows(self, step: int) -> np.ndarray:
        epoch, j = divmod(step, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng(self.seed + epoch).permutation(len(self.train)))
        return self._order[1][j * self.batch:(j + 1) * self.batch]

    def loss(self, h: torch.Tensor, y: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.name == "squared_error":
            return stt.linear_spherical_loss(h, self.head, y, loss="squared_error")
        if self.name == "spherical_softmax":
            return stt.linear_spherical_loss(h, self.head, y, loss="spherical_softmax", eps=self.eps)
        crow, col, val = y
        rows = torch.repeat_interleave(torch.arange(len(crow) - 1), crow[1:] - crow[:-1])
        o = self.head(h)
        if self.name == "softmax":
            lp = F.log_softmax(o, 1)
            return -(val * lp[rows, col]).sum() / h.shape[0]
        # bce: sum over D of softplus(o) - t o with multi-hot t (duplicates counted once)
        hot = torch.zeros_like(o)
        hot[rows, col] = 1.0
        return (F.softplus(o).sum() - (hot * o).sum()) / h.shape[0]

    def train_step(self, step: int) -> float:
        ids, offsets, y = self.train.batch(self.rows(step))
        return self.optimize(self.loss(self.body(ids, offsets), y))

    @torch.no_grad()
    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Each head's ranking score of all D words, (m, D)."""
        o = self.head.logits(h) if self.name in FACTORED else self.head(h)
        return o.abs() if self.name == "spherical_softmax" else o

    @torch.no_grad()
    def evaluate(self, tile: int = 200) -> dict[str, Any]:
        self.body.eval()
        best_rank, hits5, in_top = [], [], {1: [], 10: [], 100: []}
        k = min(100, self.D)
        for i in range(0, len(self.test), tile):
            rows = np.arange(i, min(i + tile, len(self.test)))
            ids, offsets, (crow, col, _) = self.test.batch(rows)
            h = self.body(ids, offsets)
            if self.name == "spherical_softmax":
                top = self.head.topk(h, k, by="probability", kind="spherical_softmax", eps=self.eps).indices
            elif self.name == "squared_error":
                top = self.head.topk(h, k).indices
            else:
                top = self.head(h).topk(k, 1).indices
            s = self.scores(h)
            r = torch.repeat_interleave(torch.arange(len(rows)), crow[1:] - crow[:-1])
            target_score = s[r, col]
            rank = (s[r] > target_score[:, None]).sum(1) + 1  # 1 + words scored strictly higher
            best = torch.full((len(rows),), self.D + 1, dtype=torch.long).scatter_reduce(0, r, rank, "amin")
            best_rank.append(best)
            hot = torch.zeros(len(rows), self.D, dtype=torch.bool)
            hot[r, col] = True
            hit = hot.gather(1, top)
            for k in in_top:
                in_top[k].append(hit[:, :k].any(1))
            hits5.append(hit[:, :5].double().sum(1) / 5)
        self.body.train()
        ranks = torch.cat(best_rank).double()
        seen = torch.from_numpy(self.seen)
        out: dict[str, Any] = {f"acc@{k}": float(torch.cat(v).double().mean()) for k, v in in_top.items()}
        out.update({"median_rank": float(ranks.median()), "p@1": out["acc@1"],
                    "p@5": float(torch.cat(hits5).mean()),
                    "seen_acc@10": float(torch.cat(in_top[10])[seen].double().mean()) if seen.any() else None,
                    "seen_median_rank": float(ranks[seen].median()) if seen.any() else None})
        return out



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sparsetarget.examples.reverse_dictionary",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gcide", required=True, help="GCIDE in dictd format (gcide.dict.dz or its text)")
    p.add_argument("--wordnet", required=True, help="WordNet 3.0 directory with data.noun, data.verb, ...")
    common.add_shared_arguments(p, HEADS, budget_s=240.0, slices=5, embed=256, dim=256)
    p.add_argument("--input-vocab", type=int, default=50_000, help="input words kept (+ <unk>)")
    p.add_argument("--test-glosses", type=int, default=1000, help="WordNet glosses held out for testing")
    p.add_argument("--max-examples", type=int, default=0, help="read only the first N of each dictionary (0: all)")
    args = p.parse_args(argv)
    common.check_positive(p, args, ("slices", "embed", "dim", "batch", "input_vocab", "test_glosses"))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison; returns what it writes to ``OUT/results.json``."""
    args = parse_args(argv)
    heads, lrs = common.setup_run(args, HEADS, DEFAULT_LR)
    words, vocab, train, test, info = load(args)
    seen = info.pop("seen_mask")
    trainers = [RDTrainer(h, args, len(words), len(vocab), train, test, seen, lrs[h]) for h in heads]
    if not args.no_resume:
        common.resume(trainers, args.out)
    config = {k: v for k, v in vars(args).items() if k != "lr"}
    config.update(lr={h: lrs[h] for h in heads}, **info)
    results: dict[str, Any] = {"load_average_at_start": os.getloadavg(),
                               "task": "reverse dictionary (definition -> word), multi-label",
                               "corpus": "GCIDE + WordNet 3.0 glosses", "vocab_size": len(words),
                               "machine": common.machine(), "config": config, "heads": {}}

    def write() -> None:
        for tr in trainers:
            if tr.curve:
                final = {k: v for k, v in tr.curve[-1].items() if k not in ("wall_s", "step")}
                if tr.name in FACTORED:
                    diag = tr.head.diagnostics()
                    final["factorisation"] = {k: diag[k] for k in ("condition", "corrections", "refreshes")}
                final.update(examples_per_s=tr.steps * args.batch / max(tr.wall_s, 1e-9), wall_s=tr.wall_s,
                             steps=tr.steps, state_mib=tr.state_mib(), step_peak_mib=tr.step_peak_mib)
                results["heads"][tr.name] = {"final": final, "curve": tr.curve, "failed": tr.failed or None,
                                             "train_loss": tr.train_loss}
        common.write_json(os.path.join(args.out, "results.json"), results)

    common.round_robin(trainers, args.budget_s, args.slices, args.out, on_point=write)
    results["load_average_at_end"] = os.getloadavg()
    write()
    common.plot_curves(results, [("median_rank", "held-out median rank (log)"), ("acc@10", "held-out accuracy@10"),
                          ("acc@100", "held-out accuracy@100")], os.path.join(args.out, "results.png"),
                f"{results['task']}, D = {results['vocab_size']}\n{results['machine']}",
                logy=("median_rank",))
    print(f"{'head':>17} {'steps':>7} {'ex/s':>7} {'acc@1':>6} {'acc@10':>6} {'acc@100':>7} {'med.rank':>8} "
          f"{'P@5':>6}")
    for name, head in results["heads"].items():
        f = head["final"]
        print(f"{name:>17} {f['steps']:>7} {f['examples_per_s']:>7.0f} {f['acc@1']:>6.3f} {f['acc@10']:>6.3f} "
              f"{f['acc@100']:>7.3f} {f['median_rank']:>8.0f} {f['p@5']:>6.3f}")
    return results


if __name__ == "__main__":
    main()
