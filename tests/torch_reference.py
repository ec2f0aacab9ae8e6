"""Dense torch references: the losses written on the full (m, D) outputs of an nn.Linear, and target helpers."""

from __future__ import annotations

import numpy as np
import torch
from conftest import make_targets


def torch_targets(kind: str, m: int, D: int, rng: np.random.Generator, form: str = "sparse"):
    """Targets for the torch API: class labels (LongTensor), or multi-label CSR as a sparse CSR tensor (form
    'sparse') or a (crow, col, values) tuple (form 'tuple'), with duplicate indices within and across rows."""
    t = make_targets(kind, m, D, rng)
    if kind.startswith("class"):
        return torch.from_numpy(np.asarray(t, dtype=np.int64))
    crow = torch.from_numpy(np.asarray(t.indptr, dtype=np.int64))
    col = torch.from_numpy(np.asarray(t.indices, dtype=np.int64))
    values = torch.from_numpy(np.asarray(t.data, dtype=np.float64))
    if form == "tuple":
        return crow, col, values
    return torch.sparse_csr_tensor(crow, col, values, size=(m, D), check_invariants=False)  # duplicates kept


def dense_target(target, m: int, D: int, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, valid): the dense (m, D) float64 target matrix (duplicates summed) and the rows that count."""
    Y = torch.zeros(m, D, dtype=torch.float64)
    if isinstance(target, torch.Tensor) and target.layout == torch.strided:
        labels = target.reshape(-1)
        valid = labels != ignore_index
        Y[torch.arange(m)[valid], labels[valid]] = 1.0
        return Y, valid
    if isinstance(target, torch.Tensor):
        crow, col, values = target.crow_indices(), target.col_indices(), target.values()
    else:
        crow, col, values = target
    rows = torch.repeat_interleave(torch.arange(m), crow.diff())
    Y.index_put_((rows, col), values.to(torch.float64), accumulate=True)
    return Y, torch.ones(m, dtype=torch.bool)


def dense_per_row(o: torch.Tensor, Y: torch.Tensor, loss: str, opts: dict) -> torch.Tensor:
    """Per-example losses from the full outputs o (m, D), written directly from their definitions."""
    Y = Y.to(o.dtype)
    if loss == "squared_error":
        return ((o - Y) ** 2).sum(1)
    if loss == "spherical_softmax":
        num = o * o + opts.get("eps", 1e-2)
        return -(Y * torch.log(num / num.sum(1, keepdim=True))).sum(1)
    if loss == "taylor_softmax":
        num = 1 + o + o * o / 2
        return -(Y * torch.log(num / num.sum(1, keepdim=True))).sum(1)
    if loss == "z_loss":
        a, b = opts.get("a", 0.1), opts.get("b", 10.0)
        z = (o - o.mean(1, keepdim=True)) / o.std(1, correction=0, keepdim=True)
        return (Y * torch.logaddexp(a * (b - z), torch.zeros(())) / a).sum(1)
    raise ValueError(loss)


def dense_loss(o: torch.Tensor, target, loss: str, opts: dict, reduction: str, ignore_index: int = -100,
               lead_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The dense loss with cross_entropy's reductions (mean over rows that are not ignored)."""
    m, D = o.shape
    Y, valid = dense_target(target, m, D, ignore_index)
    per_row = torch.where(valid, dense_per_row(o, Y, loss, opts), torch.zeros((), dtype=o.dtype))
    if reduction == "none":
        return per_row.reshape(lead_shape or (m,))
    return per_row.sum() if reduction == "sum" else per_row.sum() / valid.sum()


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(1, max |b|)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def to_device(target, device):
    """A torch target (class labels, sparse CSR tensor or (crow, col, values) tuple) on ``device``."""
    if isinstance(target, tuple):
        return tuple(t.to(device) for t in target)
    return target.to(device)
