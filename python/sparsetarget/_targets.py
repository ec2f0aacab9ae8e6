"""Conversion and checking of targets: class labels or CSR multi-label matrices, to the core's CSR arrays."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class CSRTargets(NamedTuple):
    """Targets of a minibatch as CSR arrays (int64 indptr and indices, float64 values) plus a row mask."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    active: np.ndarray | None  # uint8 per row; None when every row counts
    is_class: bool  # True when the targets were class labels


def is_csr_like(targets: Any) -> bool:
    """True for scipy.sparse compressed matrices and anything with ``indptr``, ``indices``, ``data`` and ``shape``
    (read as CSR unless its ``format`` says otherwise)."""
    return all(hasattr(targets, name) for name in ("indptr", "indices", "data", "shape"))


_INT64_MAX = np.iinfo(np.int64).max


def _int_array(x: Any, name: str) -> np.ndarray:
    """``x`` as a contiguous int64 array; raises TypeError for non-integers and ValueError for unsigned values that
    int64 cannot hold (a cast would wrap them to negative numbers, e.g. 2**64 - 100 to -100)."""
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and arr.max() > _INT64_MAX:
        raise ValueError(f"{name} contains {arr.max()}, which is out of range (more than 2**63 - 1)")
    return np.ascontiguousarray(arr, dtype=np.int64)


def to_csr(targets: Any, m: int, out_features: int, ignore_index: int, name: str = "targets") -> CSRTargets:
    """Check ``targets`` against a minibatch of ``m`` rows and ``out_features`` classes; return CSR arrays.

    ``name`` is how error messages call the argument.
    """
    if type(targets) is np.ndarray and targets.dtype == np.int64 and targets.shape == (m,):
        return _class_csr(targets, out_features, ignore_index, name)  # the usual step's labels, without probing
    if is_csr_like(targets):
        layout = getattr(targets, "format", "csr")  # scipy.sparse: CSC and BSR carry indptr, indices, data too
        if layout != "csr":
            if not callable(getattr(targets, "tocsr", None)):
                raise TypeError(f"{name} is a sparse matrix in {layout!r} format; give a CSR matrix")
            targets = targets.tocsr()
        shape = tuple(targets.shape)
        if shape != (m, out_features):
            raise ValueError(f"{name} has shape {shape}, expected (m, D) = ({m}, {out_features})")
        indptr = _int_array(targets.indptr, f"{name}.indptr")
        indices = _int_array(targets.indices, f"{name}.indices")
        data = np.asarray(targets.data)
        if not (np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.integer)):
            raise TypeError(f"{name}.data must be a real numeric array, got dtype {data.dtype}")
        values = np.ascontiguousarray(data, dtype=np.float64)
        if indptr.shape != (m + 1,) or indices.ndim != 1 or values.shape != indices.shape:
            raise ValueError(f"{name} is not a valid CSR matrix: indptr must have m + 1 entries and data the "
                             "same length as indices")
        if indptr[0] != 0 or indptr[-1] != indices.size or np.any(np.diff(indptr) < 0):
            raise ValueError(f"{name} is not a valid CSR matrix: indptr (crow_indices) must start at 0, never "
                             f"decrease and end at nnz = {indices.size}, got {indptr[0]} ... {indptr[-1]}")
        if indices.size and (indices.min() < 0 or indices.max() >= out_features):
            bad = indices[(indices < 0) | (indices >= out_features)][0]
            raise ValueError(f"{name} index {bad} is out of range [0, {out_features})")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{name} values contain NaN or inf")
        # arrays of their own: a recorded update must not see later in-place changes of the caller's arrays
        return CSRTargets(*(np.array(a, copy=True) if np.may_share_memory(a, b) else a
                            for a, b in ((indptr, targets.indptr), (indices, targets.indices), (values, targets.data))),
                          None, False)

    labels = np.asarray(targets)
    if labels.dtype != np.int64:
        if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"{name} must be an integer array of class indices or a CSR matrix, got dtype "
                            f"{labels.dtype}")
        labels = _int_array(labels, name)
    if labels.shape != (m,):
        raise ValueError(f"{name} has shape {labels.shape}, expected ({m},) to match H")
    return _class_csr(labels, out_features, ignore_index, name)


def _class_csr(labels: np.ndarray, out_features: int, ignore_index: int, name: str) -> CSRTargets:
    """int64 class labels (m,) as CSR targets, checked by the core (``_engine.class_csr``)."""
    from ._engine import class_csr  # the engine imports this module

    return class_csr(np.ascontiguousarray(labels), out_features, ignore_index, name)
