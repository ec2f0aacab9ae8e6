"""Losses of the spherical family written on the head's outputs (A, q, s), and ``linear_spherical_loss``.

Every loss here is a function of A (outputs at the target entries), q = ||o||^2 and s = sum(o) only, so autograd
hands the head exactly dL/dA, dL/dq and dL/ds, and the head trains exactly in O(d^2) per example. Per-example
definitions are those of the NumPy API (``sparsetarget.LOSS_OPTIONS``); for targets y (a class: y = e_c; or
multi-label values, duplicates summed) and D outputs:

- ``squared_error``: ||o - y||^2
- ``spherical_softmax``: -sum_k y_k log p_k with p_k = (o_k^2 + eps) / (||o||^2 + D eps)
- ``taylor_softmax``: -sum_k y_k log p_k with p_k = (1 + o_k + o_k^2 / 2) / (D + sum(o) + ||o||^2 / 2)
- ``z_loss``: sum_k y_k softplus(a (b - z_k)) / a with z = (o - mean(o)) / std(o)

Reductions follow ``torch.nn.functional.cross_entropy``: ``'mean'`` averages over the rows that are not
``ignore_index`` (all rows for multi-label targets), ``'sum'`` adds them, ``'none'`` returns one loss per row
(0 on ignored rows) in the input's leading shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import torch

from .._engine import LOSS_OPTIONS, loss_spec
from ._target import SparseTarget

if TYPE_CHECKING:
    from .modules import FactoredLinear

REDUCTIONS = ("mean", "sum", "none")


class HeadOutput(NamedTuple):
    """What a :class:`FactoredLinear` head returns for an input and its targets.

    A, q and s are differentiable with respect to the input; any loss written in torch on them trains exactly.

    Attributes:
        A: outputs at the target entries: (m,) for class targets (0 on ignored rows), (nnz,) in CSR order for
            multi-label targets.
        q: (m,) squared norms ||o_j||^2 of the full output rows.
        s: (m,) sums sum_k o_jk of the full output rows.
        target: the checked targets (:class:`SparseTarget`): per-entry values and rows, valid rows, ||y||^2.
    """

    A: torch.Tensor
    q: torch.Tensor
    s: torch.Tensor
    target: SparseTarget


def row_sum(out: HeadOutput, x: torch.Tensor) -> torch.Tensor:
    """Sum a per-entry quantity (shaped like ``out.A``) into one value per row, (m,)."""
    rows = out.target.rows
    if rows is None:
        return x
    return x.new_zeros(out.q.shape[0]).index_add(0, rows, x)


def entries_of_rows(out: HeadOutput, x: torch.Tensor) -> torch.Tensor:
    """Spread a per-row quantity (m,) over the entries of ``out.A``."""
    rows = out.target.rows
    return x if rows is None else x[rows]


def reduce_loss(out: HeadOutput, per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``reduction`` to per-row losses (m,), zeroing ignored rows first."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    valid = out.target.valid
    per_row = torch.where(valid, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
    if reduction == "none":
        return per_row.reshape(out.target.shape)
    total = per_row.sum()
    return total if reduction == "sum" else total / valid.sum()


def squared_error_loss(out: HeadOutput, *, reduction: str = "mean") -> torch.Tensor:
    """||o - y||^2 = q - 2 y.A + ||y||^2 per example."""
    t = out.target
    return reduce_loss(out, out.q - 2 * row_sum(out, t.values * out.A) + t.sq_norm, reduction)


def spherical_softmax_loss(out: HeadOutput, *, eps: float = LOSS_OPTIONS["spherical_softmax"]["eps"],
                           reduction: str = "mean") -> torch.Tensor:
    """-sum_k y_k log((o_k^2 + eps) / (q + D eps)) per example."""
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    t = out.target
    log_norm = torch.log(out.q + t.out_features * eps)
    per_row = row_sum(out, t.values) * log_norm - row_sum(out, t.values * torch.log(out.A * out.A + eps))
    return reduce_loss(out, per_row, reduction)


def taylor_softmax_loss(out: HeadOutput, *, reduction: str = "mean") -> torch.Tensor:
    """-sum_k y_k log((1 + o_k + o_k^2 / 2) / (D + s + q / 2)) per example."""
    t = out.target
    log_norm = torch.log(t.out_features + out.s + 0.5 * out.q)
    per_row = row_sum(out, t.values) * log_norm - row_sum(out, t.values * torch.log1p(out.A + 0.5 * out.A * out.A))
    return reduce_loss(out, per_row, reduction)


def z_loss(out: HeadOutput, *, a: float = LOSS_OPTIONS["z_loss"]["a"], b: float = LOSS_OPTIONS["z_loss"]["b"],
           reduction: str = "mean") -> torch.Tensor:
    """sum_k y_k softplus(a (b - z_k)) / a per example, z = (o - mean(o)) / std(o) from s and q."""
    if not a > 0:
        raise ValueError(f"a must be > 0, got {a}")
    t = out.target
    D = t.out_features
    mean = out.s / D
    var = out.q / D - mean * mean
    var = torch.where(t.valid, var, torch.ones((), dtype=var.dtype, device=var.device))  # ignored rows: unused
    z = (out.A - entries_of_rows(out, mean)) / entries_of_rows(out, torch.sqrt(var))
    x = a * (b - z)
    softplus = torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device))
    return reduce_loss(out, row_sum(out, t.values * softplus) / a, reduction)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "squared_error": squared_error_loss,
    "spherical_softmax": spherical_softmax_loss,
    "taylor_softmax": taylor_softmax_loss,
    "z_loss": z_loss,
}
"""The built-in losses by name, as in :data:`sparsetarget.LOSS_OPTIONS`."""


class BoundLoss:
    """A built-in loss with its options checked: ``spec`` for the cores, ``fn`` and ``options`` for torch. Pickles
    (and deep-copies) as its name and options."""

    __slots__ = ("name", "options", "spec", "fn")

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        self.spec, self.options = loss_spec(name, options)  # the NumPy API's checks: names and domains of the options
        self.name = name
        self.fn = LOSSES[name]

    def __reduce__(self) -> tuple[Any, ...]:
        return (BoundLoss, (self.name, dict(self.options)))

    def of_head(self, input: torch.Tensor, head: FactoredLinear, target: Any, reduction: str,
                ignore_index: int) -> torch.Tensor:
        """The reduced loss of ``head`` on ``input`` and ``target``: one autograd node where the head's engine
        evaluates the loss itself (the CPU core, a head without hooks), else ``fn`` written in torch on the head's
        (A, q, s)."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        fused = head._fused_loss(input, target, ignore_index, self.spec, reduction)
        if fused is not None:
            return fused
        return self.fn(head(input, target, ignore_index=ignore_index), reduction=reduction, **self.options)


_BOUND_LOSSES: dict[tuple[Any, ...], BoundLoss] = {}  # by name and plain-number options: checked once


def loss_function(loss: str, options: dict[str, Any]) -> BoundLoss:
    """The loss ``loss`` with its options checked and bound."""
    plain = type(loss) is str and all(type(v) in (int, float) for v in options.values())
    key = (loss, *sorted(options.items())) if plain else None
    bound = _BOUND_LOSSES.get(key) if key is not None else None
    if bound is None:
        bound = BoundLoss(loss, options)
        if key is not None and len(_BOUND_LOSSES) < 256:
            _BOUND_LOSSES[key] = bound
    return bound


def linear_spherical_loss(input: torch.Tensor, head: FactoredLinear, target: Any, *,
                          loss: str = "spherical_softmax", reduction: str = "mean", ignore_index: int = -100,
                          **loss_options: float) -> torch.Tensor:
    """The output layer ``head`` and a spherical-family loss in one call, like
    ``torch.nn.functional.linear_cross_entropy`` (a softmax cross-entropy) but exact in O(d^2) per example.

    On the CPU the loss is evaluated by the core with the head's outputs and enters autograd as one node (its
    backward scales the loss's partial derivatives); on a GPU, on a vocab-parallel shard and for a head with hooks
    or its own ``forward`` it is written in torch on ``head(...)``'s (A, q, s) like the functions above. Both give the
    same values and gradients where the loss is defined; where it is not (Z-loss of an output row with zero
    variance) the core raises a ValueError and the torch expression gives NaN. On the CPU, in grad mode, the forward
    also computes dL/dh for the backward and the step (an m x d x d product): evaluate under ``torch.no_grad()``.

    Args:
        input: hidden activations (..., in_features), any floating dtype (half precision is computed in the head's
            state dtype).
        head: the :class:`FactoredLinear` output layer.
        target: class indices (input's leading shape), or for a 2-D input a sparse CSR tensor / (crow_indices,
            col_indices, values) tuple of shape (m, out_features) with multi-label values (duplicates summed).
        loss: ``"squared_error"``, ``"spherical_softmax"`` (option ``eps``), ``"taylor_softmax"`` or ``"z_loss"``
            (options ``a``, ``b``).
        reduction: ``"mean"`` (over rows that are not ignored), ``"sum"`` or ``"none"``.
        ignore_index: class label whose rows contribute no loss, gradient or update.
    """
    return loss_function(loss, loss_options).of_head(input, head, target, reduction, ignore_index)
