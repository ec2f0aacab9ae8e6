"""The autograd Function of the factored head: (h) -> (A, q, s), and the exact backward.

Forward runs the engine's O(m d^2 + nnz d) projection and gather. Backward turns dL/dA, dL/dq, dL/ds into the exact
dL/dh and hands them, with H and the forward's projections, to the head's ``record`` callback as a pending update;
the optimizer applies all pending updates of a head in one exact factored step (``Engine.step``). The Functions
know the engine and the two callbacks of :class:`HeadCall`, nothing else of the module.

:class:`FactoredLossFunction` is the same head with a built-in loss fused in (engines with ``fuses_losses``): the
core evaluates the losses and their partials with the outputs, so the loss is one autograd node instead of a graph
of small torch operations, and its backward only scales the partials by the upstream gradient.
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
        save_call(ctx, h, call, projections)
        return A, q, s

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gA: torch.Tensor | None, gq: torch.Tensor | None,
                 gs: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None]:
        call: HeadCall = ctx.call
        m, like = call.H.shape[0], call.H
        dA = upstream_derivative(gA, call.target.values.numel(), like)
        return exact_backward(ctx, dA, upstream_derivative(gq, m, like), upstream_derivative(gs, m, like)), None, None


def save_call(ctx: Any, h: torch.Tensor, call: HeadCall, projections: Any) -> None:
    """What a backward of this forward needs: the call (H copied when it shares memory with h: the pending update
    must not see later in-place changes of h) and the projections."""
    ctx.call = call._replace(H=call.H if call.owned else call.H.clone())
    ctx.projections = projections
    ctx.h_dtype = h.dtype
    ctx.in_features = h.shape[1]


def exact_backward(ctx: Any, dA: torch.Tensor, dq: torch.Tensor, ds: torch.Tensor) -> torch.Tensor | None:
    """dL/dh from the loss partials (owned tensors in the state dtype), and the pending update when the head trains."""
    call: HeadCall = ctx.call
    call.check_current()
    grad_h = grad_H = None
    if ctx.needs_input_grad[0]:
        grad_H = call.engine.grad_hidden(call.H, call.target.csr, dA, dq, ds, ctx.projections)
        # a copy: autograd may accumulate into the returned tensor, the pending update keeps grad_H
        grad_h = grad_H[:, :ctx.in_features].to(ctx.h_dtype, copy=True)
    if ctx.needs_input_grad[1]:
        call.record(Recorded(call.H, call.target.csr, dA, dq, ds, ctx.projections, grad_H))
    return grad_h


class FactoredLossFunction(torch.autograd.Function):
    """(h, anchor, call, spec, reduction) -> the reduced built-in loss ``spec`` of the head's outputs: per row
    (``'none'``, shaped like the targets), summed (``'sum'``) or averaged over the rows that are not ignored
    (``'mean'``)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, anchor: torch.Tensor, call: HeadCall,  # type: ignore[override]
                spec: Any, reduction: str) -> torch.Tensor:
        losses, dA, dq, ds, projections = call.engine.forward_loss(call.H, call.target.csr, spec)
        save_call(ctx, h, call, projections)
        ctx.partials = (dA, dq, ds)
        ctx.reduction = reduction
        per_row = losses.to(call.H.dtype)
        target = call.target
        if reduction == "none":
            return per_row.reshape(target.shape)
        ctx.rows = int(target.valid.sum()) if reduction == "mean" else 1
        return per_row.sum() / ctx.rows

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        dA, dq, ds = ctx.partials
        target, dtype = ctx.call.target, ctx.call.H.dtype
        # ignored rows take no gradient whatever the upstream value (as through the torch.where of reduce_loss):
        # their partials are 0, and 0 * inf would be NaN
        if ctx.reduction == "none":
            w = grad.reshape(-1).to(dtype)
            w = torch.where(target.valid, w, torch.zeros((), dtype=dtype))
            wA = w if target.rows is None else w[target.rows]
            partials = (dA * wA, dq * w, ds * w)
        else:
            w = grad.to(dtype) / ctx.rows if ctx.rows else torch.zeros((), dtype=dtype)
            partials = (dA * w, dq * w, ds * w)
        return exact_backward(ctx, *partials), None, None, None, None
