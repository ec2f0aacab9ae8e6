"""Real text for training big output layers: reading, tokenising, vocabularies, splits and batches (NumPy only).

Everything streams: text is read line by line (plain files, directories, gzip or dictzip files such as
``/usr/share/dictd/gcide.dict.dz``), and only the token ids of the corpus (int32) and the word counts of the
vocabulary are ever held in memory.

- :func:`tokenize`: lower-case words (letters, with inner apostrophes); digits and punctuation are dropped.
- :func:`iter_documents`: the documents of a file or directory; a document is a paragraph (lines up to a blank
  line).
- :class:`Vocabulary`: ``<unk>`` (id 0) and the D most frequent words by decreasing count (ids 1..D), so the ids
  are frequency-sorted (what ``nn.AdaptiveLogSoftmaxWithLoss`` expects).
- :func:`split_of`: a reproducible train/validation/test assignment of each document by its index.
- :func:`encode_corpus` -> :class:`EncodedCorpus`: token ids of one split plus document starts.
- :func:`ngram_batches`: (contexts, next word) batches for n-gram language models.
- :func:`to_csr`, :func:`multilabel_batches`: multi-label targets as CSR (indptr, indices, values).
- :func:`read_gcide`, :func:`read_wordnet_glosses`: (headwords, definition) pairs from the GCIDE dictionary and
  WordNet 3.0 synsets, for a reverse dictionary (definition -> word).

Corpora and where to get them: ``benchmarks/data/README.md`` and ``benchmarks/data/fetch.sh``.
"""

from __future__ import annotations

import collections
import gzip
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
UNK = "<unk>"
SPLITS = ("train", "valid", "test")


def tokenize(text: str) -> list[str]:
    """Lower-case words of ``text``: runs of letters, with inner apostrophes kept ("don't", "o'clock")."""
    return WORD.findall(text.lower())


def _files(path: str | os.PathLike[str]) -> list[str]:
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path {path!r} is neither a file nor a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        found += [os.path.join(dirpath, name) for name in sorted(filenames) if not name.startswith(".")]
    return found


def open_text(path: str | os.PathLike[str]) -> Iterator[str]:
    """Lines of a text file, decompressed when it is gzip (``.gz``) or dictzip (``.dz``, gzip-compatible);
    undecodable bytes are replaced."""
    path = os.fspath(path)
    with open(path, "rb") as raw:
        magic = raw.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        yield from f


def iter_documents(path: str | os.PathLike[str]) -> Iterator[str]:
    """The documents under ``path`` (a file, a gzip/dictzip file, or a directory read recursively in sorted
    order): paragraphs, i.e. runs of non-blank lines, one string each."""
    for name in _files(path):
        lines: list[str] = []
        for line in open_text(name):
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines)
                lines = []
        if lines:
            yield "".join(lines)


def _unit_hash(index: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per integer (splitmix64 of index and seed)."""
    with np.errstate(over="ignore"):
        x = np.asarray(index, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_of(doc_index: int | np.ndarray, fractions: Sequence[float] = (0.9, 0.05, 0.05), seed: int = 0
             ) -> str | np.ndarray:
    """Which split ("train", "valid", "test") a document goes to, from its index alone (reproducible, streaming).

    ``fractions``: shares of train, validation and test (non-negative, summing to 1). Vectorised for an array."""
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or (f < 0).any() or abs(f.sum() - 1) > 1e-9:
        raise ValueError(f"fractions must be three non-negative shares summing to 1, got {tuple(fractions)}")
    u = _unit_hash(np.atleast_1d(doc_index), seed)
    which = np.where(u < f[0], 0, np.where(u < f[0] + f[1], 1, 2))
    names = np.array(SPLITS)[which]
    return str(names[0]) if np.ndim(doc_index) == 0 else names


class Vocabulary:
    """``<unk>`` (id 0) followed by words in decreasing frequency (ties: alphabetical), so ids are frequency-ranked.

    Args:
        words: the words, most frequent first (without ``<unk>``).
        counts: their counts in the text the vocabulary was built from (optional, same length).
    """

    def __init__(self, words: Sequence[str], counts: Sequence[int] | None = None) -> None:
        if UNK in words:
            raise ValueError(f"words must not contain {UNK!r}: it is added as id 0")
        self.words: list[str] = [UNK, *words]
        self.ids: dict[str, int] = {w: i for i, w in enumerate(self.words)}
        if len(self.ids) != len(self.words):
            raise ValueError("words must be distinct")
        self.counts = None if counts is None else np.asarray([0, *counts], dtype=np.int64)

    unk_id = 0

    @classmethod
    def build(cls, tokens: Iterable[Iterable[str]], size: int, *, min_count: int = 1) -> Vocabulary:
        """The ``size`` most frequent words (at least ``min_count`` times) of ``tokens`` (an iterable of token
        lists, e.g. one per document); ``<unk>`` is counted as the words left out."""
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        counter: collections.Counter[str] = collections.Counter()
        for toks in tokens:
            counter.update(toks)
        ranked = sorted(((c, w) for w, c in counter.items() if c >= min_count and w != UNK),
                        key=lambda cw: (-cw[0], cw[1]))[:int(size)]
        vocab = cls([w for _, w in ranked], [c for c, _ in ranked])
        assert vocab.counts is not None
        vocab.counts[0] = sum(counter.values()) - int(vocab.counts.sum())
        return vocab

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.ids

    def id(self, word: str) -> int:
        """Id of ``word``, 0 (``<unk>``) when it is not in the vocabulary."""
        return self.ids.get(word, 0)

    def encode(self, tokens: Iterable[str]) -> np.ndarray:
        """Ids (int32) of ``tokens``; unknown words map to 0."""
        get = self.ids.get
        return np.fromiter((get(t, 0) for t in tokens), dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of ``ids``."""
        return [self.words[int(i)] for i in ids]

    def save(self, path: str | os.PathLike[str]) -> None:
        """One ``word<TAB>count`` line per word, ``<unk>`` first."""
        counts = self.counts if self.counts is not None else np.zeros(len(self.words), dtype=np.int64)
        with open(path, "w", encoding="utf-8") as f:
            for w, c in zip(self.words, counts):
                f.write(f"{w}\t{int(c)}\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocabulary:
        """A vocabulary written by :meth:`save`."""
        words, counts = [], []
        with open(path, encoding="utf-8") as f:
            for line in f:
                w, c = line.rstrip("\n").split("\t")
                words.append(w)
                counts.append(int(c))
        if not words or words[0] != UNK:
            raise ValueError(f"path {os.fspath(path)!r} is not a saved Vocabulary (first word must be {UNK!r})")
        return cls(words[1:], counts[1:])


def split_tokens(path: str | os.PathLike[str], split: str | None = "train", *,
                 fractions: Sequence[float] = (0.9, 0.05, 0.05), seed: int = 0) -> Iterator[list[str]]:
    """Token lists of the documents of ``path`` in ``split`` (None: all documents), streamed."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    for i, doc in enumerate(iter_documents(path)):
        if split is None or split_of(i, fractions, seed) == split:
            yield tokenize(doc)


@dataclass
class EncodedCorpus:
    """Token ids of a set of documents, concatenated (int32), and where each document starts.

    Attributes:
        ids: (N,) token ids.
        starts: (num_docs,) index in ``ids`` of each document's first token (int64, increasing).
    """

    ids: np.ndarray
    starts: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def encode_corpus(path: str | os.PathLike[str], vocab: Vocabulary, split: str | None = "train", *,
                  fractions: Sequence[float] = (0.9, 0.05, 0.05), seed: int = 0,
                  chunk: int = 1 << 20) -> EncodedCorpus:
    """Ids of the documents of ``path`` in ``split``, encoded while streaming (memory: the ids only)."""
    chunks: list[np.ndarray] = []
    buf = np.empty(chunk, dtype=np.int32)
    used = 0
    total = 0
    starts: list[int] = []
    for toks in split_tokens(path, split, fractions=fractions, seed=seed):
        if not toks:
            continue
        ids = vocab.encode(toks)
        starts.append(total)
        total += len(ids)
        while len(ids):
            take = min(len(ids), chunk - used)
            buf[used:used + take] = ids[:take]
            used += take
            ids = ids[take:]
            if used == chunk:
                chunks.append(buf)
                buf = np.empty(chunk, dtype=np.int32)
                used = 0
    chunks.append(buf[:used].copy())
    return EncodedCorpus(np.concatenate(chunks), np.asarray(starts, dtype=np.int64))


def ngram_contexts(corpus: EncodedCorpus, positions: np.ndarray, context: int, pad_id: int) -> np.ndarray:
    """(len(positions), context) ids of the ``context`` words before each position; words before the start of
    the position's document are ``pad_id``."""
    if int(context) < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    positions = np.asarray(positions, dtype=np.int64)
    doc_start = corpus.starts[np.searchsorted(corpus.starts, positions, side="right") - 1]
    offsets = np.arange(-int(context), 0, dtype=np.int64)
    idx = positions[:, None] + offsets[None, :]
    X = corpus.ids[np.maximum(idx, 0)].astype(np.int64)
    X[idx < doc_start[:, None]] = pad_id
    return X


def ngram_batches(corpus: EncodedCorpus, context: int, batch_size: int, *, pad_id: int, shuffle: bool = True,
                  seed: int = 0, epochs: int | None = 1, drop_last: bool = False
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches ``(X, y)`` for an n-gram language model: X (m, context) int64 previous words (``pad_id`` before a
    document's start), y (m,) int64 the next word. Every token of the corpus is a target once per epoch, in a
    seeded random order when ``shuffle`` (epoch e uses seed + e); ``epochs=None`` repeats forever."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(corpus)
    if n == 0:
        raise ValueError("corpus has no tokens")
    epoch = 0
    while epochs is None or epoch < epochs:
        order = np.random.default_rng(seed + epoch).permutation(n) if shuffle else np.arange(n)
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            pos = order[i:i + batch_size]
            yield ngram_contexts(corpus, pos, context, pad_id), corpus.ids[pos].astype(np.int64)
        epoch += 1


def to_csr(rows: Sequence[Sequence[int]], num_cols: int, values: Sequence[Sequence[float]] | None = None, *,
           normalize: bool = False, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, indices, values) of a CSR matrix with one row per entry of ``rows`` (column indices in
    [0, num_cols)). ``values`` default to 1; ``normalize`` scales each non-empty row to sum to 1."""
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in rows])
    indices = np.fromiter((c for r in rows for c in r), dtype=np.int64, count=int(indptr[-1]))
    if indices.size and (indices.min() < 0 or indices.max() >= num_cols):
        raise ValueError(f"rows has a column index outside [0, num_cols={num_cols})")
    if values is None:
        data = np.ones(indices.shape[0], dtype=dtype)
    else:
        if len(values) != len(rows) or any(len(v) != len(r) for v, r in zip(values, rows)):
            raise ValueError("values must have the shape of rows")
        data = np.fromiter((x for v in values for x in v), dtype=dtype, count=int(indptr[-1]))
    if normalize:
        lengths = np.diff(indptr)
        filled = lengths > 0  # reduceat over the non-empty rows only: it cannot start a row at index nnz
        sums = np.ones(len(rows), dtype=dtype)
        if data.size:
            sums[filled] = np.add.reduceat(data, indptr[:-1][filled])
        data = (data / np.repeat(sums, lengths)).astype(dtype)
    return indptr, indices, data


def csr_rows(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR matrix made of ``rows`` (in that order) of a CSR matrix."""
    rows = np.asarray(rows, dtype=np.int64)
    lengths = indptr[rows + 1] - indptr[rows]
    out_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_ptr[1:])
    take = np.repeat(indptr[rows] - out_ptr[:-1], lengths) + np.arange(out_ptr[-1], dtype=np.int64)
    return out_ptr, indices[take], data[take]


def multilabel_batches(inputs: tuple[np.ndarray, np.ndarray], targets: tuple[np.ndarray, np.ndarray, np.ndarray],
                       batch_size: int, *, shuffle: bool = True, seed: int = 0, epochs: int | None = 1
                       ) -> Iterator[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Batches of a multi-label data set: ``inputs`` (indptr, token ids) one bag of words per example, ``targets``
    (indptr, indices, values) CSR. Yields ((offsets, ids), (indptr, indices, values)) per batch: ``offsets`` (m,)
    where each bag starts in ``ids`` (``nn.EmbeddingBag`` style), the targets as a CSR batch (m rows)."""
    x_ptr, x_ids = inputs
    n = len(x_ptr) - 1
    if len(targets[0]) - 1 != n:
        raise ValueError(f"inputs has {n} examples, targets {len(targets[0]) - 1}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ones = np.ones_like(x_ids, dtype=np.float32)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = np.random.default_rng(seed + epoch).permutation(n) if shuffle else np.arange(n)
        for i in range(0, n, batch_size):
            rows = order[i:i + batch_size]
            bptr, bids, _ = csr_rows(x_ptr, x_ids, ones, rows)
            yield (bptr[:-1], bids), csr_rows(*targets, rows)
        epoch += 1


# ---------------------------------------------------------------------------------------------- dictionaries
_GCIDE_SENSE = re.compile(r"^\s*(\d+)\.\s+")
_GCIDE_SENSE_LINE = re.compile(r"\n[ \t]+\d+\.\s+")
_BRACKETS = re.compile(r"\[[^\]]*\]")
_CITATION = re.compile(r"--\s*[A-Z][^\n]*")
_PRONUNCIATION = re.compile(r"\\[^\\]*\\")


def _gcide_definition(paragraph: str) -> str:
    text, before = paragraph, None
    while text != before:  # nested brackets: innermost first
        before, text = text, _BRACKETS.sub(" ", text)
    text = re.sub(r"[\[\]]", " ", text)
    text = _CITATION.sub(" ", text)
    return " ".join(text.split())


def read_gcide(path: str | os.PathLike[str]) -> Iterator[tuple[str, str]]:
    """(headword, definition) pairs of the GCIDE dictionary in dictd format (``gcide.dict.dz`` or its
    uncompressed text), streamed. Headwords are lower-cased; multi-word headwords are skipped. A definition is a
    numbered sense, or the text after the headword line of an entry without numbered senses; etymologies and
    other bracketed notes, citations (``--Shak.``), ``Syn:``/``Note:`` paragraphs and sub-entries (``{...}``) are
    left out."""
    head: str | None = None
    numbered = False
    first: str | None = None

    def finish() -> Iterator[tuple[str, str]]:
        if head is not None and not numbered and first is not None:
            rest = _PRONUNCIATION.sub(" ", first, count=1)
            rest = rest.split(",", 1)[1] if "," in rest else ""
            text = _gcide_definition(rest)
            if text:
                yield head, text

    for paragraph in iter_documents(path):
        if not paragraph[0].isspace():  # an entry's headword line: "Word \Pro*nun"ci*a`tion\, n. ..."
            yield from finish()
            name = paragraph.split("\\", 1)[0].strip()
            head = name.lower() if re.fullmatch(r"[A-Za-z][A-Za-z'-]*", name) else None
            numbered = False
            first = paragraph
            m = _GCIDE_SENSE_LINE.search(paragraph)
            if m and head is not None:  # the first numbered sense often follows the headword line directly
                numbered = True
                first = paragraph[:m.start()]
                text = _gcide_definition(paragraph[m.end():])
                if text:
                    yield head, text
            continue
        if head is None:
            continue
        m = _GCIDE_SENSE.match(paragraph)
        if m:
            numbered = True
            text = _gcide_definition(paragraph[m.end():])
            if text:
                yield head, text
    yield from finish()


def read_wordnet_glosses(path: str | os.PathLike[str]) -> Iterator[tuple[list[str], str]]:
    """(lemmas, definition) per synset of WordNet 3.0 (``path``: the directory with ``data.noun``, ``data.verb``,
    ``data.adj``, ``data.adv``). Lemmas are lower-cased single words (multi-word lemmas and synsets without a
    single-word lemma are skipped); the definition is the gloss without its quoted examples."""
    for pos in ("noun", "verb", "adj", "adv"):
        name = os.path.join(os.fspath(path), f"data.{pos}")
        if not os.path.exists(name):
            raise FileNotFoundError(f"path {os.fspath(path)!r} has no data.{pos} (WordNet 3.0 dict directory)")
        for line in open_text(name):
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            count = int(parts[3], 16)
            lemmas = []
            for i in range(count):
                lemma = re.sub(r"\([a-z]+\)$", "", parts[4 + 2 * i]).lower()
                if re.fullmatch(r"[a-z][a-z'-]*", lemma) and lemma not in lemmas:
                    lemmas.append(lemma)
            definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
            if lemmas and definition:
                yield lemmas, definition
