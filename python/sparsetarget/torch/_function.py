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

import math
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .._engine import Engine, Recorded, rows_from_entries
from ._target import SparseTarget

_NON_FINITE_UPSTREAM = "the gradient flowing into the loss (backward's upstream gradient) contains NaN or inf"


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
        save_call(ctx, h, anchor, call, projections)
        return A, q, s

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gA: torch.Tensor | None, gq: torch.Tensor | None,
                 gs: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None]:
        graph_alive(ctx)
        call: HeadCall = ctx.call
        m, like = call.H.shape[0], call.H
        dA = upstream_derivative(gA, call.target.entries, like)
        return exact_backward(ctx, dA, upstream_derivative(gq, m, like), upstream_derivative(gs, m, like)), None, None


def save_call(ctx: Any, h: torch.Tensor, anchor: torch.Tensor, call: HeadCall, projections: Any,
              H_copy: Any = None) -> None:
    """What a backward of this forward needs: the call (H copied when it shares memory with h: the pending update
    must not see later in-place changes of h; ``H_copy``: that copy when the engine made it) and the
    projections. The anchor is saved as autograd saves tensors, so that autograd refuses a second backward through
    a freed graph (see :func:`graph_alive`)."""
    ctx.save_for_backward(anchor)
    if not call.owned:
        call = call._replace(H=call.H.clone() if H_copy is None else torch.from_numpy(H_copy))
    ctx.call = call
    ctx.projections = projections
    ctx.h_dtype = h.dtype
    ctx.in_features = h.shape[1]


def graph_alive(ctx: Any) -> None:
    """Raise, as autograd does for its own nodes, when this backward runs through a graph already freed by an
    earlier backward without ``retain_graph=True`` (the update would otherwise be recorded twice)."""
    ctx.saved_tensors  # noqa: B018 (the access is the check)


def records_update(ctx: Any) -> bool:
    """True when this backward pass accumulates the head's gradient: the head trains and autograd runs the gradient
    accumulation of its anchor, as ``backward()`` does for every weight. ``torch.autograd.grad(loss, inputs)`` and
    ``backward(inputs=...)`` without the head leave the weights' gradients alone, and so record nothing."""
    if not ctx.needs_input_grad[1]:
        return False
    accumulate = ctx.next_functions[1][0]  # the anchor's AccumulateGrad node
    if accumulate is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(accumulate))
    except RuntimeError:
        # inside torch.autograd.grad(..., inputs) listing the anchor: gradients are returned, none is accumulated,
        # so nothing is recorded; with no graph task of the engine to ask (another executor): record, as backward()
        current = getattr(torch._C, "_current_graph_task_id", None)
        return current is not None and current() == -1


def exact_backward(ctx: Any, dA: Any, dq: Any, ds: Any, grad_H: Any = None) -> torch.Tensor | None:
    """dL/dh from the loss partials (owned, in the state dtype; tensors or NumPy arrays), and the pending update when
    the head trains. ``grad_H``: dL/dH of these partials when already known (else computed here when needed)."""
    call: HeadCall = ctx.call
    call.check_current()
    grad_h = None
    if ctx.needs_input_grad[0]:
        if grad_H is None:
            grad_H = call.engine.grad_hidden(call.H, call.target.csr, dA, dq, ds, ctx.projections)
        # a copy: autograd may accumulate into the returned tensor, the pending update keeps grad_H
        if isinstance(grad_H, np.ndarray) and grad_H.shape[1] == ctx.in_features and ctx.h_dtype == call.H.dtype:
            grad_h = torch.from_numpy(grad_H.copy())  # the same copy in fewer calls
        else:
            grad_h = torch.as_tensor(grad_H)[:, :ctx.in_features].to(ctx.h_dtype, copy=True)
    if records_update(ctx):
        call.record(Recorded(call.H, call.target.csr, dA, dq, ds, ctx.projections, grad_H))
    return grad_h


class FactoredLossFunction(torch.autograd.Function):
    """(h, anchor, call, spec, reduction, with_grad) -> the reduced built-in loss ``spec`` of the head's outputs: per
    row (``'none'``, shaped like the targets), summed (``'sum'``) or averaged over the rows that are not ignored
    (``'mean'``). With ``with_grad`` (a backward may follow) the forward also computes dL/dH of the unreduced loss;
    dL/dH of the reduced loss is that scaled per row by the upstream gradient (it is linear in the loss partials)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, anchor: torch.Tensor, call: HeadCall,  # type: ignore[override]
                spec: Any, reduction: str, with_grad: bool) -> torch.Tensor:
        csr = call.target.csr
        # H copied by the core (while it reads H anyway) when it shares memory with h and a backward can follow
        losses, dA, dq, ds, projections, grad_H, total, H_copy = call.engine.forward_loss(
            call.H, csr, spec, with_grad, with_grad and not call.owned)
        dtype = call.H.dtype
        if with_grad:
            save_call(ctx, h, anchor, call, projections, H_copy)
            ctx.partials = (rows_from_entries(dA, csr), dq, ds, grad_H)
            ctx.reduction = reduction
        if reduction == "none":  # ignored rows have loss 0
            return torch.from_numpy(losses).to(dtype).reshape(call.target.shape)
        rows = call.target.rows_counted if reduction == "mean" else 1
        ctx.rows = rows
        return torch.full((), total / rows if rows else math.nan, dtype=dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None, None]:
        graph_alive(ctx)
        dA, dq, ds, grad_H = ctx.partials
        if ctx.reduction == "none":
            w: Any = grad.detach().reshape(-1).to(torch.float64).numpy().astype(dq.dtype)
        else:
            w = grad.item() / ctx.rows if ctx.rows else 0.0
            if w == 1:  # backward() of a sum: nothing to scale
                return exact_backward(ctx, dA, dq, ds, grad_H), None, None, None, None, None
        return exact_backward(ctx, *scaled_partials(ctx, w, dA, dq, ds, grad_H)), None, None, None, None, None


def scaled_partials(ctx: Any, w: Any, dA: np.ndarray, dq: np.ndarray, ds: np.ndarray,
                    grad_H: np.ndarray | None) -> tuple[Any, ...]:
    """The partials and dL/dH of the unreduced losses scaled by the upstream gradient of the reduced loss: ``w``,
    one factor (a float) for 'sum' and 'mean', one per row (an array, changed here) for 'none'. Ignored rows take no
    gradient whatever their upstream value (as through the torch.where of reduce_loss); a NaN or inf upstream value
    of a row that counts raises ValueError, as the partials it makes do in the head's other path."""
    csr = ctx.call.target.csr
    if isinstance(w, float):
        if not math.isfinite(w):
            raise ValueError(_NON_FINITE_UPSTREAM)
        return tuple(None if x is None else x * dq.dtype.type(w) for x in (dA, dq, ds, grad_H))
    if csr.active is not None:
        w[csr.active == 0] = 0
    if not np.isfinite(w).all():
        raise ValueError(_NON_FINITE_UPSTREAM)
    wA = w if csr.is_class else np.repeat(w, np.diff(csr.indptr))
    return dA * wA, dq * w, ds * w, None if grad_H is None else grad_H * w[:, None]
