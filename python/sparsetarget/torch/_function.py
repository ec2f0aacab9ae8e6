"""The autograd Function of the factored head: (h) -> (A, q, s), and the exact backward.

Forward runs the core's O(m d^2 + nnz d) projection and gather. Backward turns dL/dA, dL/dq, dL/ds into the exact
dL/dh and records them, with h and the forward's projections, as a pending update of the head; the optimizer
applies all pending updates of a head in one exact factored step (see ``FactoredLinear._apply_pending``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.function import once_differentiable

from ._backend import PendingUpdate
from ._target import SparseTarget

if TYPE_CHECKING:
    from .modules import FactoredLinear


def _derivative(grad: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    """An upstream gradient as an owned contiguous tensor in the state dtype (zeros when autograd gave None)."""
    if grad is None:
        return like.new_zeros(n)
    return grad.detach().to(dtype=like.dtype, copy=True).contiguous()


class FactoredHeadFunction(torch.autograd.Function):
    """(h, anchor, head, target) -> (A, q, s); ``anchor`` is a scalar that requires grad when the head trains,
    so that the outputs require grad even when h does not."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, anchor: torch.Tensor, head: FactoredLinear,  # type: ignore[override]
                target: SparseTarget) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        H, owned = head._hidden(h)
        A, q, s, projections = head._engine().forward(H, target)
        ctx.head = head
        ctx.target = target
        ctx.H = H if owned else H.clone()  # the pending update must not see later in-place changes of h
        ctx.projections = projections
        ctx.version = head._version
        ctx.h_dtype = h.dtype
        return A, q, s

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
        H = ctx.H
        m = H.shape[0]
        dA = _derivative(gA, target.values.numel(), H)
        dq = _derivative(gq, m, H)
        ds = _derivative(gs, m, H)
        grad_h = grad_H = None
        if ctx.needs_input_grad[0]:
            grad_H = head._engine().grad_hidden(H, target, dA, dq, ds, ctx.projections)
            # a copy: autograd may accumulate into the returned tensor, the pending update keeps grad_H
            grad_h = grad_H[:, :head.in_features].to(ctx.h_dtype, copy=True)
        if ctx.needs_input_grad[1]:
            head._record(PendingUpdate(H, target, dA, dq, ds, ctx.projections, grad_H))
        return grad_h, None, None, None
