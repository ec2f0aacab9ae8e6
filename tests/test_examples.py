"""Both examples end to end on tiny generated text (seconds each): results files, exactness checks, learning,
resuming from checkpoints."""

import gzip
import importlib.util
import json
import math

import numpy as np
import pytest

pytest.importorskip("torch")
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None  # plots are optional

from sparsetarget.examples import lm, reverse_dictionary  # noqa: E402
from sparsetarget.examples._common import MILESTONES  # noqa: E402

WORDS = [f"w{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(40)]


def write_lm_corpus(path, docs=240, seed=0):
    """Documents where each word is followed by one of two words fixed per word: top-10 accuracy can reach 1."""
    rng = np.random.default_rng(seed)
    nxt = rng.integers(0, len(WORDS), (len(WORDS), 2))
    with gzip.open(path, "wt") as f:
        for _ in range(docs):
            w = int(rng.integers(len(WORDS)))
            toks = []
            for _ in range(int(rng.integers(15, 30))):
                toks.append(WORDS[w])
                w = int(nxt[w, rng.integers(2)])
            f.write(" ".join(toks) + "\n\n")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    corpus = tmp / "corpus.txt.gz"
    write_lm_corpus(corpus)
    out = tmp / "out"
    argv = ["--corpus", str(corpus), "--vocab-size", "100", "--budget-s", "0.6", "--slices", "2", "--out", str(out),
            "--dim", "16", "--embed", "8", "--hidden", "32", "--batch", "16", "--samples", "8", "--eval-words", "200",
            "--threads", "1"]
    lrs = {"spherical_softmax": 0.1, "taylor_softmax": 0.1, "z_loss": 0.05, "softmax": 0.3, "dense_spherical": 0.1,
           "adaptive_softmax": 0.1, "sampled_softmax": 0.1}
    for head, lr in lrs.items():
        argv += ["--lr", f"{head}={lr}"]
    return lm.main(argv), out, argv


def test_lm_writes_results_for_every_head(lm_run):
    results, out, _ = lm_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["heads"].keys() == set(lm.HEADS)
    assert on_disk["vocab_size"] == len(WORDS) + 1  # the words and <unk>
    assert "cores" in on_disk["machine"]
    for name, head in on_disk["heads"].items():
        final = head["final"]
        assert head["failed"] is None, (name, head["failed"])
        assert final["steps"] > 0 and final["wall_s"] >= 0.6 - 1e-6, (name, final)
        slices = [p for p in head["curve"] if not p.get("milestone")]
        assert len(slices) == 2 and head["curve"][-1]["top10"] == final["top10"], (name, head["curve"])
        assert [p["step"] for p in head["curve"] if p.get("milestone")] == [s for s in sorted(MILESTONES)
                                                                             if s <= final["steps"]], name
        assert 0 <= final["top1"] <= final["top10"] <= 1, (name, final)
        assert (final["nll"] is None) == (name == "z_loss"), name
        assert (out / f"{name}.pt").exists()
    assert (out / "results.png").exists() == HAS_MATPLOTLIB


def test_lm_heads_learn_the_text(lm_run):
    results, _, _ = lm_run
    # each word has two possible successors: chance top-10 is 10/41, a trained model gets near 1
    for name in ("spherical_softmax", "taylor_softmax", "softmax", "dense_spherical", "adaptive_softmax"):
        assert results["heads"][name]["final"]["top10"] > 0.6, name
        assert results["heads"][name]["final"]["nll"] < math.log(41) - 0.5, name  # better than uniform


def test_lm_exactness_is_measured(lm_run):
    results, _, _ = lm_run
    assert results["exactness_float64"]["max_abs_loss_diff"] < 1e-9
    assert results["exactness"]["max_abs_loss_diff_first_20"] < 1e-4
    assert set(results["log_prob_check"]) == {"spherical_softmax", "taylor_softmax"}
    assert max(results["log_prob_check"].values()) < 1e-4


def test_lm_resumes_from_checkpoints(lm_run):
    results, out, argv = lm_run
    before = {n: h["final"]["steps"] for n, h in results["heads"].items()}
    argv = list(argv)
    argv[argv.index("--budget-s") + 1] = "0.9"
    argv[argv.index("--slices") + 1] = "3"
    again = lm.main([*argv, "--heads", "spherical_softmax,softmax"])
    for name in ("spherical_softmax", "softmax"):
        head = again["heads"][name]
        old = results["heads"][name]["curve"]
        assert head["final"]["steps"] > before[name] and sum(not p.get("milestone") for p in head["curve"]) == 3
        assert head["curve"][:len(old)] == old


def test_lm_rejects_unknown_head(tmp_path):
    with pytest.raises(SystemExit, match="--heads"):
        lm.main(["--corpus", str(tmp_path), "--out", str(tmp_path), "--heads", "spherical_softmax,nope"])


def write_dictionaries(tmp):
    """Each word w has four feature words of its own; GCIDE senses list two, WordNet glosses one of each lemma."""
    rng = np.random.default_rng(1)
    lines = ["\n00-database-info\n   header\n"]
    features = {w: [f"f{w}{k}" for k in "abcd"] for w in WORDS}
    for w in WORDS:
        senses = "\n\n".join(f"   {i + 1}. " + " ".join(rng.permutation(features[w])[:2]) for i in range(3))
        lines.append(f"{w.capitalize()} \\{w}\\, n.\n{senses}\n")
    with gzip.open(tmp / "gcide.dict.dz", "wt") as f:
        f.write("\n".join(lines))
    wn = tmp / "wordnet"
    wn.mkdir()
    rows = []
    for i in range(0, len(WORDS), 2):
        a, b = WORDS[i], WORDS[i + 1]
        gloss = " ".join([*rng.permutation(features[a])[:1], *rng.permutation(features[b])[:1]])
        rows.append(f"{i:08d} 03 n 02 {a} 0 {b} 0 000 | {gloss}; \"an example\"  \n")
    (wn / "data.noun").write_text("".join(rows))
    for pos in ("verb", "adj", "adv"):
        (wn / f"data.{pos}").write_text("")
    return tmp / "gcide.dict.dz", wn


def test_reverse_dictionary_end_to_end(tmp_path):
    gcide, wn = write_dictionaries(tmp_path)
    out = tmp_path / "out"
    results = reverse_dictionary.main([
        "--gcide", str(gcide), "--wordnet", str(wn), "--budget-s", "1.0", "--slices", "2", "--out", str(out),
        "--embed", "16", "--dim", "16", "--batch", "8", "--test-glosses", "5", "--threads", "1",
        "--lr", "squared_error=0.01", "--lr", "spherical_softmax=0.1", "--lr", "softmax=0.1", "--lr", "bce=0.05"])
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["vocab_size"] == len(WORDS)
    config = on_disk["config"]
    assert config["test_examples"] == 5 and config["test_seen"] == 5
    assert config["train_examples"] == 3 * 40 + 15 - config["gcide_dropped_near_test"]
    assert on_disk["heads"].keys() == set(reverse_dictionary.HEADS)
    for name, head in results["heads"].items():
        f = head["final"]
        assert f["acc@100"] == 1.0, name  # D = 40 < 100: every target is in the top 100
        assert 1 <= f["median_rank"] <= len(WORDS) and f["acc@1"] == f["p@1"] <= f["acc@10"]
        assert 0 <= f["p@5"] <= 0.4  # at most two targets per gloss
        assert f["steps"] > 0 and sum(not p.get("milestone") for p in head["curve"]) == 2
    # two target words among 40; ranked by the model the best target is near the top
    for name in ("spherical_softmax", "softmax"):
        assert results["heads"][name]["final"]["median_rank"] <= 5, name
    assert (out / "results.png").exists() == HAS_MATPLOTLIB and (out / "spherical_softmax.pt").exists()


THREADS = """
import os, sparsetarget
{before}
import sparsetarget.torch
{after}
print(sparsetarget.get_num_threads(), sparsetarget._core.get_pass_threads())
"""


@pytest.mark.parametrize("before, after, env, want", [
    ("", "", {"OPENBLAS_NUM_THREADS": "1"}, "1 1"),  # chosen in the environment: kept, steps and passes
    ("", "", {}, "1 {default}"),  # torch's threads and the core's would compete in steps; passes keep the default
    ("sparsetarget.set_num_threads(2)", "", {}, "2 2"),  # chosen before the import: kept
    ("", "sparsetarget.set_num_threads(2)", {}, "2 2"),  # chosen after: wins
])
def test_importing_the_torch_front_end_gives_the_core_one_blas_thread_unless_chosen(before, after, env, want):
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    code = THREADS.format(before=before, after=after)
    res = subprocess.run([sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True,
                         check=True)
    default = subprocess.run([sys.executable, "-c", "import sparsetarget; print(sparsetarget.get_num_threads())"],
                             env={**environ, **env}, capture_output=True, text=True, check=True).stdout.strip()
    assert res.stdout.strip() == want.format(default=default)
