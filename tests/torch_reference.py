"""Dense torch reference: the losses of the NumPy reference (``reference.dense_loss``) on the full (m, D) outputs
of an nn.Linear, differentiable, and target helpers."""

from __future__ import annotations

import numpy as np
import torch
from conftest import CSR, make_targets
from reference import dense_loss as reference_loss
from reference import dense_targets


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
    """(Y, valid): the dense (m, D) float64 target matrix (duplicates summed) and the rows that count, from
    ``reference.dense_targets``."""
    if isinstance(target, torch.Tensor) and target.layout == torch.strided:
        Y, mask = dense_targets(target.reshape(-1).numpy(), m, D, ignore_index)
    else:
        if isinstance(target, torch.Tensor):
            crow, col, values = target.crow_indices(), target.col_indices(), target.values()
        else:
            crow, col, values = target
        Y, mask = dense_targets(CSR(crow.numpy(), col.numpy(), values.double().numpy(), (m, D)), m, D)
    valid = torch.ones(m, dtype=torch.bool) if mask is None else torch.from_numpy(mask)
    return torch.from_numpy(Y), valid


class DensePerRow(torch.autograd.Function):
    """Per-example losses of the full outputs o (m, D) and their gradient, from the NumPy reference's definitions
    (``reference.dense_loss``, computed in o's dtype): the torch suites check against the same losses as the
    NumPy suite."""

    @staticmethod
    def forward(ctx, o: torch.Tensor, Y: torch.Tensor, loss: str, opts: dict) -> torch.Tensor:
        dt = o.detach().numpy().dtype
        L, dO = reference_loss(loss, o.detach().numpy(), Y.numpy().astype(dt), opts)
        ctx.save_for_backward(torch.from_numpy(np.asarray(dO, dtype=dt)))
        return torch.from_numpy(np.asarray(L, dtype=dt))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dO,) = ctx.saved_tensors
        return grad[:, None] * dO, None, None, None


def dense_per_row(o: torch.Tensor, Y: torch.Tensor, loss: str, opts: dict) -> torch.Tensor:
    """Per-example losses from the full outputs o (m, D), differentiable (see :class:`DensePerRow`)."""
    return DensePerRow.apply(o, Y, loss, opts)


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
