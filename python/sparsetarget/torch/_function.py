"""The autograd Function of the factored head: (h) -> (A, q, s), and the exact backward.

Forward runs the engine's O(m d^2 + nnz d) projection and gather. Backward turns dL/dA, dL/dq, dL/ds into the exact
dL/dh and hands them, with H and the forward's projections, to the head's ``record`` callback as a pending update;
the optimizer applies all pending updates of a head in one exact factored step (``Engine.step``). The Function
knows the engine and the two callbacks of :class:`HeadCall`, nothing else of the module.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .._engine import Engine, Recorded
from ._target import SparseTarget


class HeadCall(NamedTuple):
    """What one forward pass of a head gives its autograd Function."""

    engine: Engine  # works in place on the head's state
    target: SparseTarget
    H: torch.Tensor  # (m, d) input rows in the state dtype (with the bias column), contiguous
    owned: bool  # False when H shares memory with the input (then the Function keeps a copy)
    check_current: Callable[[], None]  # raises when the weights changed since this forward pass
    record: Callable[[Recorded], None]  # takes the update of a backward pass


def upstream_derivative(grad: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    """An upstream gradient as an owned contiguous tensor in the state dtype (zeros when autograd gave None)."""
    if grad is None:
        return like.new_zeros(n)
    return grad.detach().to(dtype=like.dtype, copy=True).contiguous()


class FactoredHeadFunction(torch.autograd.Function):
    """(h, anchor, call) -> (A, q, s); ``anchor`` is a scalar that requires grad when the head trains, so that the
    outputs require grad even when h does not."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, anchor: torch.Tensor,  # type: ignore[override]
                call: HeadCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        A, q, s, projections = call.engine.forward(call.H, call.target.csr)
        ctx.call = call._replace(H=call.H if call.owned else call.H.clone())  # the pending update must not see
        # later in-place changes of h
        ctx.projections = projections
        ctx.h_dtype = h.dtype
        ctx.in_features = h.shape[1]
        return A, q, s

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gA: torch.Tensor | None, gq: torch.Tensor | None,
                 gs: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None]:
        call: HeadCall = ctx.call
        call.check_current()
        H, target = call.H, call.target
        m = H.shape[0]
        dA = upstream_derivative(gA, target.values.numel(), H)
        dq = upstream_derivative(gq, m, H)
        ds = upstream_derivative(gs, m, H)
        grad_h = grad_H = None
        if ctx.needs_input_grad[0]:
            grad_H = call.engine.grad_hidden(H, target.csr, dA, dq, ds, ctx.projections)
            # a copy: autograd may accumulate into the returned tensor, the pending update keeps grad_H
            grad_h = grad_H[:, :ctx.in_features].to(ctx.h_dtype, copy=True)
        if ctx.needs_input_grad[1]:
            call.record(Recorded(H, target.csr, dA, dq, ds, ctx.projections, grad_H))
        return grad_h, None, None
