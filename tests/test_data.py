"""sparsetarget.data on text written by the tests: tokeniser, documents, vocabulary, splits, batches, dictionaries."""

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
from sparsetarget import data

TEXT = """The cat sat on the mat.
The dog didn't sit.

A second paragraph: the cat and the dog, 42 times!

Third one — café au lait, the CAT again.
"""


@pytest.fixture
def corpus_dir(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    with gzip.open(tmp_path / "b" / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("the end of the story\n\nreally the end\n")
    (tmp_path / ".hidden").write_text("never read\n")
    return tmp_path


def test_tokenize_lowercases_keeps_inner_apostrophes_drops_digits_and_punctuation():
    assert data.tokenize("The dog didn't sit, 42 times -- café 'quoted'!") == [
        "the", "dog", "didn't", "sit", "times", "café", "quoted"]


def test_documents_are_paragraphs_of_every_file_in_sorted_order_gzip_included(corpus_dir):
    docs = list(data.iter_documents(corpus_dir))
    assert len(docs) == 5
    assert docs[0] == "The cat sat on the mat.\nThe dog didn't sit.\n"
    assert docs[3:] == ["the end of the story\n", "really the end\n"]  # b/c.txt.gz after a.txt, .hidden skipped
    assert list(data.iter_documents(corpus_dir / "b" / "c.txt.gz")) == docs[3:]


def test_dictzip_is_read_as_gzip(tmp_path):
    path = tmp_path / "dict.dz"
    with gzip.open(path, "wb") as f:
        f.write(b"Word \\Word\\, n.\n   1. A unit of language.\n")
    assert list(data.open_text(path)) == ["Word \\Word\\, n.\n", "   1. A unit of language.\n"]


def test_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list(data.iter_documents(tmp_path / "nowhere"))


def test_vocabulary_is_unk_then_words_by_count_with_ties_alphabetical():
    docs = [["b", "a", "c", "a"], ["c", "a", "d"]]
    v = data.Vocabulary.build(docs, size=2)
    assert v.words == ["<unk>", "a", "c"]
    assert v.counts.tolist() == [2, 3, 2]  # <unk> counts b and d
    assert v.encode(["a", "b", "c", "zzz"]).tolist() == [1, 0, 2, 0]
    assert v.decode([2, 0]) == ["c", "<unk>"]
    assert len(v) == 3 and "a" in v and "b" not in v
    with pytest.raises(ValueError, match="size"):
        data.Vocabulary.build(docs, size=0)


def test_vocabulary_save_load_roundtrip(tmp_path):
    v = data.Vocabulary.build([["x", "y", "y"]], size=5)
    v.save(tmp_path / "v.tsv")
    w = data.Vocabulary.load(tmp_path / "v.tsv")
    assert w.words == v.words and w.counts.tolist() == v.counts.tolist() == [0, 2, 1]
    (tmp_path / "bad.tsv").write_text("x\t1\n")
    with pytest.raises(ValueError, match="path"):
        data.Vocabulary.load(tmp_path / "bad.tsv")


def test_split_by_document_is_reproducible_and_follows_fractions():
    idx = np.arange(20000)
    names = data.split_of(idx, (0.8, 0.1, 0.1), seed=3)
    share = {s: float(np.mean(names == s)) for s in data.SPLITS}
    assert abs(share["train"] - 0.8) < 0.015 and abs(share["valid"] - 0.1) < 0.01
    assert data.split_of(17, (0.8, 0.1, 0.1), seed=3) == names[17]
    assert (data.split_of(idx, (0.8, 0.1, 0.1), seed=4) != names).any()  # the seed matters
    assert set(data.split_of(idx[:50], (0, 0, 1))) == {"test"}
    with pytest.raises(ValueError, match="fractions"):
        data.split_of(1, (0.5, 0.6, 0.1))


def test_encode_corpus_keeps_document_starts_and_only_its_split(tmp_path):
    (tmp_path / "t.txt").write_text("a b c\n\nd e\n\nf\n")
    vocab = data.Vocabulary(["a", "b", "c", "d", "e", "f"])
    everything = data.encode_corpus(tmp_path, vocab, split=None, chunk=2)  # chunks smaller than a document
    assert everything.ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert everything.starts.tolist() == [0, 3, 5]
    parts = [data.encode_corpus(tmp_path, vocab, s, fractions=(0.4, 0.3, 0.3), seed=1) for s in data.SPLITS]
    assert sum(len(p) for p in parts) == 6
    assert sorted(np.concatenate([p.ids for p in parts]).tolist()) == [1, 2, 3, 4, 5, 6]


def test_ngram_contexts_pad_before_each_document():
    corpus = data.EncodedCorpus(np.array([5, 6, 7, 8, 9], dtype=np.int32), np.array([0, 3]))
    X = data.ngram_contexts(corpus, np.array([0, 2, 3, 4]), context=2, pad_id=99)
    assert X.tolist() == [[99, 99], [5, 6], [99, 99], [99, 8]]


def test_ngram_batches_cover_every_token_once_per_epoch_in_a_seeded_order():
    ids = np.arange(10, 33, dtype=np.int32)
    corpus = data.EncodedCorpus(ids, np.array([0, 10]))
    batches = list(data.ngram_batches(corpus, 3, 5, pad_id=-1, seed=7))
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    ys = np.concatenate([y for _, y in batches])
    assert sorted(ys.tolist()) == ids.tolist() and ys.tolist() != ids.tolist()
    for X, y in batches:  # each context is the three ids before the target, padded at a document start
        for row, t in zip(X, y):
            first = 10 if t < 20 else 20  # the first id of the target's document
            want = [v if v >= first else -1 for v in (t - 3, t - 2, t - 1)]
            assert row.tolist() == want
    again = [y.tolist() for _, y in data.ngram_batches(corpus, 3, 5, pad_id=-1, seed=7)]
    assert again == [y.tolist() for _, y in batches]
    two = list(data.ngram_batches(corpus, 3, 5, pad_id=-1, seed=7, epochs=2, drop_last=True))
    assert len(two) == 8


def test_to_csr_values_normalized_and_row_selection():
    indptr, indices, values = data.to_csr([[3, 1], [], [2]], 4, normalize=True)
    assert indptr.tolist() == [0, 2, 2, 3] and indices.tolist() == [3, 1, 2]
    assert values.tolist() == [0.5, 0.5, 1.0]
    ptr, idx, val = data.to_csr([[0, 1, 2]], 3, values=[[1.0, 2.0, 1.0]], normalize=True)
    assert val.tolist() == [0.25, 0.5, 0.25]
    ptr, idx, val = data.to_csr([[], [1, 2], [], [0], [], []], 3, values=[[], [1.0, 3.0], [], [2.0], [], []],
                                normalize=True)  # empty rows first, between and last
    assert ptr.tolist() == [0, 0, 2, 2, 3, 3, 3] and val.tolist() == [0.25, 0.75, 1.0]
    assert [a.tolist() for a in data.to_csr([[], []], 3, normalize=True)] == [[0, 0, 0], [], []]
    sub = data.csr_rows(indptr, indices, values, np.array([2, 0]))
    assert sub[0].tolist() == [0, 1, 3] and sub[1].tolist() == [2, 3, 1] and sub[2].tolist() == [1.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="num_cols"):
        data.to_csr([[4]], 4)


def test_multilabel_batches_pair_each_bag_with_its_targets():
    inputs = (np.array([0, 2, 3, 6]), np.array([10, 11, 20, 30, 31, 32]))
    targets = data.to_csr([[1], [2, 3], [0]], 4, normalize=True)
    seen = {}
    for (offsets, ids), (indptr, indices, values) in data.multilabel_batches(inputs, targets, 2, seed=1):
        bags = np.split(ids, offsets[1:])
        for j, bag in enumerate(bags):
            seen[int(bag[0]) // 10] = (indices[indptr[j]:indptr[j + 1]].tolist(), values[indptr[j]:indptr[j + 1]])
    assert {k: v[0] for k, v in seen.items()} == {1: [1], 2: [2, 3], 3: [0]}
    assert seen[2][1].tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="targets"):
        next(data.multilabel_batches(inputs, data.to_csr([[1]], 4), 2))


GCIDE = """
00-database-info
   This is the header.

Abase \\A*base"\\, v. t. [F. abaisser, [LL.] abassare.]
   1. To lower or depress; to throw or cast down. [Obs.]
      [1913 Webster]

            Saying so, he abased his lance.       --Shelton.
      [1913 Webster]

   2. To reduce or lower, as in rank, office; to degrade.
      [1913 Webster]

   Syn: To lower; degrade.

Abased \\A*based"\\, a. Lowered in position. --Spenser.
   [1913 Webster]

Black death \\Black death\\, n. A plague.
"""


def test_read_gcide_senses_and_unnumbered_entries_without_notes(tmp_path):
    path = tmp_path / "gcide.dict.dz"
    with gzip.open(path, "wt") as f:
        f.write(GCIDE)
    assert list(data.read_gcide(path)) == [
        ("abase", "To lower or depress; to throw or cast down."),
        ("abase", "To reduce or lower, as in rank, office; to degrade."),
        ("abased", "a. Lowered in position."),
    ]


def test_read_wordnet_glosses_single_word_lemmas_without_examples(tmp_path):
    lines = {
        "noun": ["  1 This software and database is being provided\n",
                 "00001740 03 n 02 entity 0 physical_entity 0 000 | that which exists; \"an example\"  \n",
                 "00001741 03 n 01 ice_cream 0 000 | a frozen dessert  \n"],
        "verb": ["00000001 29 v 02 Breathe 0 respire(a) 0 000 | draw air  \n"],
        "adj": [], "adv": []}
    for pos, content in lines.items():
        (tmp_path / f"data.{pos}").write_text("".join(content))
    assert list(data.read_wordnet_glosses(tmp_path)) == [(["entity"], "that which exists"),
                                                         (["breathe", "respire"], "draw air")]
    os.remove(tmp_path / "data.adv")
    with pytest.raises(FileNotFoundError, match="data.adv"):
        list(data.read_wordnet_glosses(tmp_path))


def test_data_module_never_imports_torch():
    code = "import sys, sparsetarget.data; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
