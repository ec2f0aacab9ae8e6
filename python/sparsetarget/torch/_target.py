"""Targets of the torch front end: class labels or multi-label CSR, checked and converted once per call."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from .._engine import DeviceCSR, class_csr
from .._targets import CSRTargets, to_csr


class SparseTarget:
    """A minibatch's targets as the losses see them (one entry per element of ``HeadOutput.A``).

    Attributes:
        values: (len(A),) target value y of each entry of A: 1 for a class label, 0 on an ignored row, the given
            value for multi-label targets.
        rows: (len(A),) the row of each entry, or None for class labels (entry j belongs to row j).
        valid: (m,) True for rows that count (not ``ignore_index``); the mean reduction divides by its sum.
        sq_norm: (m,) ||y_j||^2 with duplicate indices summed first.
        out_features: D.
        shape: the leading shape of the input, which ``reduction='none'`` gives back.
        csr: the targets as the engine takes them: NumPy CSR arrays for the CPU, int64 tensors on a GPU.

    The four tensors are built from the checked host CSR arrays when first read, where they were not given (a loss
    the core evaluates never reads them).
    """

    __slots__ = ("out_features", "shape", "csr", "_host", "_dtype", "_device", "_tensors")

    def __init__(self, csr: CSRTargets | DeviceCSR, out_features: int, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, host: CSRTargets | None = None,
                 tensors: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor] | None = None) -> None:
        self.csr = csr
        self.out_features = out_features
        self.shape = shape
        self._host = host  # the checked host CSR the tensors are built from (when not given)
        self._dtype = dtype
        self._device = device
        self._tensors = tensors

    @property
    def values(self) -> torch.Tensor:
        return self._built()[0]

    @property
    def rows(self) -> torch.Tensor | None:
        return self._built()[1]

    @property
    def valid(self) -> torch.Tensor:
        return self._built()[2]

    @property
    def sq_norm(self) -> torch.Tensor:
        return self._built()[3]

    @property
    def is_class(self) -> bool:
        """True when the targets are class labels (A has one entry per row)."""
        return self.csr.is_class

    @property
    def entries(self) -> int:
        """len(A): one entry per row for class labels (ignored rows included), one per target entry otherwise."""
        return math.prod(self.shape) if self.is_class else int(self.csr.indices.shape[0])

    @property
    def rows_counted(self) -> int:
        """How many rows count (are not ``ignore_index``): the divisor of the mean reduction."""
        host = self._host
        if host is None:
            return int(self.valid.sum())
        return host.indices.shape[0] if host.is_class else host.indptr.shape[0] - 1  # class labels: one entry per row

    def _built(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        if self._tensors is None:
            assert self._host is not None
            self._tensors = _host_tensors(self._host, self.out_features, self._dtype, self._device)
        return self._tensors


def _host_tensors(csr: CSRTargets, out_features: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(values, rows, valid, sq_norm) of checked host CSR targets, on ``device``."""
    m = csr.indptr.shape[0] - 1
    if csr.is_class:
        valid = torch.ones(m, dtype=torch.bool) if csr.active is None else torch.from_numpy(csr.active.astype(bool))
        valid = valid.to(device)
        values = valid.to(dtype)
        return values, None, valid, values
    counts = torch.from_numpy(np.diff(csr.indptr))
    rows = torch.repeat_interleave(torch.arange(m), counts)
    vals = torch.from_numpy(csr.values)
    cols = torch.from_numpy(csr.indices)
    keys, inverse = torch.unique(rows * out_features + cols, return_inverse=True)
    summed = torch.zeros(keys.numel(), dtype=torch.float64).index_add_(0, inverse, vals)
    sq_norm = torch.zeros(m, dtype=torch.float64).index_add_(0, keys // out_features, summed * summed)
    valid = torch.ones(m, dtype=torch.bool)
    return (vals.to(device=device, dtype=dtype), rows.to(device), valid.to(device),
            sq_norm.to(device=device, dtype=dtype))


def _csr_parts(target: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    if isinstance(target, torch.Tensor) and target.layout == torch.sparse_csr:
        return target.crow_indices(), target.col_indices(), target.values()
    if isinstance(target, (tuple, list)) and len(target) == 3 and all(isinstance(x, torch.Tensor) for x in target):
        return target[0], target[1], target[2]
    return None


def _cpu_numpy(t: torch.Tensor, name: str, device: torch.device) -> np.ndarray:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the head")
    return t.detach().cpu().contiguous().numpy()  # multi-label targets on a GPU are checked on the host


def _on_device(csr: CSRTargets, device: torch.device) -> CSRTargets | DeviceCSR:
    if device.type == "cpu":
        return csr
    return DeviceCSR(torch.from_numpy(csr.indptr).to(device), torch.from_numpy(csr.indices).to(device), None, False)


_CPU = torch.device("cpu")


def plain_class_target(target: Any, lead_shape: tuple[int, ...], out_features: int, ignore_index: int,
                       dtype: torch.dtype) -> SparseTarget | None:
    """The targets of a head on the CPU in their most common form, int64 class labels on the CPU shaped like
    ``lead_shape``, checked and converted in the fewest calls (the core checks the range); None for any other form
    (then :func:`convert_target` checks it in full)."""
    if (type(target) is not torch.Tensor or target.dtype is not torch.int64 or not target.is_cpu
            or target.layout is not torch.strided or not target.is_contiguous() or target.shape != lead_shape):
        return None
    labels = target.numpy()
    csr = class_csr(labels if labels.ndim == 1 else labels.reshape(-1), out_features, ignore_index, "target")
    return SparseTarget(csr, out_features, lead_shape, dtype, _CPU, host=csr)


def convert_target(target: Any, lead_shape: tuple[int, ...], out_features: int, ignore_index: int,
                   dtype: torch.dtype, device: torch.device) -> SparseTarget:
    """Check ``target`` against an input of leading shape ``lead_shape`` and build the :class:`SparseTarget`."""
    if device.type == "cpu":
        plain = plain_class_target(target, lead_shape, out_features, ignore_index, dtype)
        if plain is not None:
            return plain
    m = math.prod(lead_shape)
    parts = _csr_parts(target)
    if parts is not None:
        if len(lead_shape) != 1:
            raise ValueError(f"multi-label (CSR) targets need a 2-D input (m, in_features), got leading shape "
                             f"{lead_shape}")
        crow, col, values = parts
        if values.dtype.is_complex or values.dtype == torch.bool:
            raise TypeError(f"target values must be real numbers, got {values.dtype}")
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else (m, out_features)
        view = SimpleNamespace(indptr=_cpu_numpy(crow, "target crow_indices", device),
                               indices=_cpu_numpy(col, "target col_indices", device),
                               data=_cpu_numpy(values, "target values", device), shape=shape)
        csr = to_csr(view, m, out_features, ignore_index, name="target")
        return SparseTarget(_on_device(csr, device), out_features, tuple(lead_shape), dtype, device, host=csr)

    if not isinstance(target, torch.Tensor):
        raise TypeError("target must be a tensor of class indices, a sparse CSR tensor or a (crow_indices, "
                        f"col_indices, values) tuple, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if tuple(target.shape) != tuple(lead_shape):
        raise ValueError(f"target has shape {tuple(target.shape)}, expected {tuple(lead_shape)} (the input's leading "
                         "dimensions)")
    if device.type == "cuda":
        return _device_class_target(target, lead_shape, m, out_features, ignore_index, dtype, device)
    csr = to_csr(_cpu_numpy(target.reshape(-1), "target", device), m, out_features, ignore_index, name="target")
    return SparseTarget(csr, out_features, tuple(lead_shape), dtype, device, host=csr)


def _device_class_target(target: torch.Tensor, lead_shape: tuple[int, ...], m: int, out_features: int,
                         ignore_index: int, dtype: torch.dtype, device: torch.device) -> SparseTarget:
    """Class labels on a GPU, converted without waiting for the device: every row keeps one entry (ignored rows
    point at index 0 with A and dL/dA masked to 0); a label outside [0, D) is reported by the backend."""
    if target.device != device:
        raise ValueError(f"target is on {target.device}, expected {device} like the head")
    if not -2**63 <= ignore_index < 2**63:  # as class_csr on the CPU: a comparison would silently match nothing
        raise ValueError(f"ignore_index must fit in int64 like the labels, got {ignore_index}")
    labels = target.detach().reshape(-1)
    valid = labels != ignore_index
    indices = torch.where(valid, labels, labels.new_zeros(())).to(torch.int64).contiguous()
    indptr = torch.arange(m + 1, dtype=torch.int64, device=device)
    values = valid.to(dtype)
    return SparseTarget(DeviceCSR(indptr, indices, valid, True), out_features, tuple(lead_shape), dtype, device,
                        tensors=(values, None, valid, values))
