import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))


class CSR:
    """A minimal CSR container: anything with indptr/indices/data/shape is accepted as targets."""

    def __init__(self, indptr, indices, data, shape):
        self.indptr = np.asarray(indptr)
        self.indices = np.asarray(indices)
        self.data = np.asarray(data)
        self.shape = shape


def make_targets(kind: str, m: int, D: int, rng: np.random.Generator):
    """Targets of a given kind: class labels, labels with ignored rows, or multi-label CSR with duplicates."""
    if kind == "class":
        labels = rng.integers(0, D, m)
        if m > 2:
            labels[1] = labels[0]  # the same class twice in one batch
        return labels
    if kind == "class_ignore":
        labels = rng.integers(0, D, m)
        labels[::3] = -100
        return labels
    if kind == "csr":
        indptr = [0]
        indices, data = [], []
        for j in range(m):
            k = int(rng.integers(0, 4)) if j % 4 else 3
            idx = list(rng.integers(0, D, k))
            if k >= 2:
                idx[1] = idx[0]  # duplicate within the row
            if j > 0 and indices:
                idx.append(indices[0])  # shared with an earlier row
            indices += [int(i) for i in idx]
            data += list(rng.uniform(0.2, 1.0, len(idx)))
            indptr.append(len(indices))
        return CSR(indptr, indices, data, (m, D))
    raise ValueError(kind)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
