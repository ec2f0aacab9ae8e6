"""The autograd Function of the factored head: (h) -> (A, q, s), and the exact backward.

Forward runs the core's O(m d^2 + nnz d) projection and gather. Backward turns dL/dA, dL/dq, dL/ds into the exact
dL/dh and records them, with h and the forward's projections, as a pending update of the head; the optimizer
applies all pending updates of a head in one exact factored step (see ``FactoredLinear._apply_pending``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ._backend import from_numpy
from ._target import SparseTarget

if TYPE_CHECKING:
    from .modules import FactoredLinear


class PendingUpdate(NamedTuple):
    """What one backward call contributes to the next optimizer step of a head (NumPy arrays, state dtype)."""

    H: np.ndarray  # (m, d) hidden rows, bias column included
    indptr: np.ndarray
    indices: np.ndarray
    dA: np.ndarray  # (nnz,) dL/dA per target entry
    dq: np.ndarray  # (m,)
    ds: np.ndarray  # (m,)
    projections: tuple[np.ndarray, ...]  # (UH, HQ, q, s, Hw) of H at the forward's weights
    grad_H: np.ndarray | None  # dL/dH (m, d) when backward computed it, reused by the step


def _derivative(grad: torch.Tensor | None, n: int, dtype: np.dtype) -> np.ndarray:
    if grad is None:
        return np.zeros(n, dtype=dtype)
    return np.ascontiguousarray(grad.detach().cpu().numpy(), dtype=dtype)


class FactoredHeadFunction(torch.autograd.Function):
    """(h, anchor, head, target) -> (A, q, s); ``anchor`` is a scalar that requires grad when the head trains,
    so that the outputs require grad even when h does not."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, anchor: torch.Tensor, head: FactoredLinear,  # type: ignore[override]
                target: SparseTarget) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        core = head._layer()._core
        H, owned = head._hidden_array(h)
        csr = target.csr
        A, q, s, projections = core.forward(H, csr.indptr, csr.indices, True)
        device = h.device
        A_t = from_numpy(A, device)
        if target.is_class and csr.active is not None:  # one entry per row, 0 on ignored rows
            full = A_t.new_zeros(H.shape[0])
            full[target.valid] = A_t
            A_t = full
        ctx.head = head
        ctx.target = target
        ctx.H = H if owned else H.copy()  # the pending update must not see later in-place changes of h
        ctx.projections = projections
        ctx.version = head._version
        ctx.h_dtype = h.dtype
        return A_t, from_numpy(q, device), from_numpy(s, device)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gA: torch.Tensor | None, gq: torch.Tensor | None,
                 gs: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None, None]:
        head: FactoredLinear = ctx.head
        target: SparseTarget = ctx.target
        if head._version != ctx.version:
            raise RuntimeError(f"{head.__class__.__name__}'s weights changed (optimizer step, refresh, stabilize, "
                               "load_state_dict or a device/dtype move) between this forward pass and its backward: "
                               "the exact gradient needs the weights of the forward pass; run the forward again")
        H, csr = ctx.H, ctx.target.csr
        m, sdt = H.shape[0], H.dtype
        dA = _derivative(gA, m if target.is_class else csr.indices.size, sdt)
        if target.is_class and csr.active is not None:
            dA = np.ascontiguousarray(dA[csr.active.astype(bool)])
        dq = _derivative(gq, m, sdt)
        ds = _derivative(gs, m, sdt)
        grad_h = grad_H = None
        if ctx.needs_input_grad[0]:
            core = head._layer()._core
            grad_H = core.grad_hidden(H, csr.indptr, csr.indices, dA, dq, ds, ctx.projections)
            # a copy: autograd may accumulate into the returned tensor, the pending update keeps grad_H
            grad_h = from_numpy(grad_H, head.V.device)[:, :head.in_features].to(ctx.h_dtype, copy=True)
        if ctx.needs_input_grad[1]:
            head._record(PendingUpdate(H, csr.indptr, csr.indices, dA, dq, ds, ctx.projections, grad_H))
        return grad_h, None, None, None
