"""Markdown tables of the committed real-data results (for the README), computed from the JSON files.

    python benchmarks/real_data_tables.py [benchmarks/results/lm_gcide.json] [benchmarks/results/rd_gcide_wordnet.json]
"""

from __future__ import annotations

import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def lm_table(path: str) -> str:
    r = json.load(open(path))
    heads = r["heads"]
    soft = heads.get("softmax", {}).get("final")
    rows = ["| head | steps | tokens/s | vs softmax | held-out NLL | perplexity | top-1 | top-10 | state MiB | "
            "step peak MiB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, h in heads.items():
        f = h["final"]
        nll = "—" if f["nll"] is None else f"{f['nll']:.3f}"
        ppl = "—" if f["nll"] is None else f"{math.exp(f['nll']):.0f}"
        speed = f"{f['tokens_per_s'] / soft['tokens_per_s']:.0f}×" if soft else ""
        rows.append(f"| `{name}` | {f['steps']} | {f['tokens_per_s']:.0f} | {speed} | {nll} | {ppl} | "
                    f"{f['top1']:.3f} | {f['top10']:.3f} | {f['state_mib']:.0f} | {f['step_peak_mib']:.0f} |")
    # the same number of steps: the milestone evaluations every head went through
    steps = sorted({p["step"] for h in heads.values() for p in h["curve"] if p.get("milestone")})
    if steps:
        rows += ["", "Per step: held-out NLL / top-10 at the same step counts (— : not reached in the budget)", "",
                 "| head | " + " | ".join(f"step {s}" for s in steps) + " |",
                 "| --- |" + " ---: |" * len(steps)]
        for name, h in heads.items():
            at = {p["step"]: p for p in h["curve"] if p.get("milestone")}
            cells = []
            for s in steps:
                p = at.get(s)
                if p is None:
                    cells.append("—")
                else:
                    nll = "—" if p["nll"] is None else f"{p['nll']:.2f}"
                    cells.append(f"{nll} / {p['top10']:.3f}")
            rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    ex, ex64 = r.get("exactness"), r.get("exactness_float64")
    notes = [f"unigram NLL of the same held-out words: {r['unigram_nll']:.3f}"]
    if ex64:
        notes.append(f"float64, {ex64['steps']} steps: max |loss difference| {ex64['max_abs_loss_diff']:.1e}, "
                     f"max |h difference| {ex64['max_abs_body_output_diff']:.1e}")
    if ex:
        notes.append(f"float32 runs: max |loss difference| first 20 steps {ex['max_abs_loss_diff_first_20']:.1e}, "
                     f"first {ex['steps']} steps {ex['max_abs_loss_diff']:.1e}")
    for k, v in r.get("log_prob_check", {}).items():
        notes.append(f"{k} log_prob vs dense float64: max |diff| {v:.1e}")
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def rd_table(path: str) -> str:
    r = json.load(open(path))
    rows = ["| head | steps | examples/s | acc@1 (P@1) | acc@10 | acc@100 | median rank | P@5 | seen: acc@10 | "
            "seen: median rank |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, h in r["heads"].items():
        f = h["final"]
        rows.append(f"| `{name}` | {f['steps']} | {f['examples_per_s']:.0f} | {f['acc@1']:.3f} | {f['acc@10']:.3f} "
                    f"| {f['acc@100']:.3f} | {f['median_rank']:.0f} | {f['p@5']:.3f} | {f['seen_acc@10']:.3f} | "
                    f"{f['seen_median_rank']:.0f} |")
    steps = sorted({p["step"] for h in r["heads"].values() for p in h["curve"] if p.get("milestone")})
    if steps:
        rows += ["", "Per step: median rank / accuracy@100 at the same step counts (— : not reached)", "",
                 "| head | " + " | ".join(f"step {s}" for s in steps) + " |", "| --- |" + " ---: |" * len(steps)]
        for name, h in r["heads"].items():
            at = {p["step"]: p for p in h["curve"] if p.get("milestone")}
            rows.append(f"| `{name}` | " + " | ".join(
                "—" if s not in at else f"{at[s]['median_rank']:.0f} / {at[s]['acc@100']:.3f}" for s in steps) + " |")
    return "\n".join(rows)


def main() -> None:
    lm = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "results", "lm_gcide.json")
    rd = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "results", "rd_gcide_wordnet.json")
    if os.path.exists(lm):
        print(lm_table(lm), "\n")
    if os.path.exists(rd):
        print(rd_table(rd))


if __name__ == "__main__":
    main()
