"""``FactoredLinear``, the exact factored output layer as an ``nn.Module``, and ``LinearSphericalLoss``."""

from __future__ import annotations

import math
import operator
import warnings
import weakref
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .._engine import (
    LOSS_OPTIONS,
    STABILIZATION_DEFAULTS,
    STATE_ARRAYS,
    TILE_ROWS,
    Engine,
    Recorded,
    check_device,
    check_distribution,
    check_int,
    engine_for,
    initial_small_state,
    log_prob_of_entries,
    stabilization_updates,
)
from ._function import FactoredHeadFunction, FactoredLossFunction, HeadCall
from ._target import convert_target, plain_class_target
from .distributed import VocabParallelHeadFunction, VocabShard, gather_update
from .functional import REDUCTIONS, HeadOutput, loss_function

FLOAT_DTYPES = (torch.float32, torch.float64)
_EPS = LOSS_OPTIONS["spherical_softmax"]["eps"]
_EXTRA_STATE_KEY = "_extra_state"  # torch.nn.Module's key for get_extra_state()
LOAD_TOLERANCE = 0.05
"""Largest relative inconsistency ``load_state_dict`` accepts between the loaded V, U, U^-1, Q, omega and w_bar
(||U U^-1 - I||_F / sqrt(d), and Q and w_bar against W = V U + 1 omega^T along two fixed random directions): far
above the drift of a trained state, far below the O(1) error of entries that do not belong together."""


def _inconsistency(state: dict[str, torch.Tensor]) -> str | None:
    """Why V, U, U_inv, Q, omega and w_bar do not belong together (beyond :data:`LOAD_TOLERANCE`), or None.
    O(D d) (one pass over V in tiles), in float64."""
    f64 = torch.float64
    U, U_inv = state["U"].to(f64), state["U_inv"].to(f64)
    d = U.shape[0]
    residual = float(torch.linalg.matrix_norm(U @ U_inv - torch.eye(d, dtype=f64, device=U.device))) / math.sqrt(d)
    if not residual <= LOAD_TOLERANCE:
        return (f"U @ U_inv is not the identity (||U U_inv - I||_F / sqrt(d) = {residual:.3g}): U and U_inv do not "
                "belong together")
    X = torch.randn(d, 2, generator=torch.Generator().manual_seed(0), dtype=f64).to(U.device)
    UX, wX = U @ X, state["omega"].to(f64) @ X
    V = state["V"]
    sq = torch.zeros(2, dtype=f64, device=U.device)
    total = torch.zeros(2, dtype=f64, device=U.device)
    tile = TILE_ROWS // 8  # a float64 tile of V stays small next to V itself
    for r0 in range(0, V.shape[0], tile):
        WX = V[r0:r0 + tile].to(f64) @ UX + wX  # rows of W X
        sq += (WX * WX).sum(0)
        total += WX.sum(0)
    xQx = ((state["Q"].to(f64) @ X) * X).sum(0)
    if not bool(((xQx - sq).abs() <= LOAD_TOLERANCE * torch.maximum(sq, xQx.abs())).all()):
        return (f"Q is not W^T W for W = V U + 1 omega^T (x^T Q x = {xQx.tolist()}, ||W x||^2 = {sq.tolist()} along "
                "two random x): Q does not belong with V, U, omega")
    xw = state["w_bar"].to(f64) @ X
    if not bool(((xw - total).abs() <= LOAD_TOLERANCE * torch.sqrt(sq * V.shape[0])).all()):
        return (f"w_bar is not W^T 1 for W = V U + 1 omega^T (w_bar . x = {xw.tolist()}, 1^T W x = {total.tolist()} "
                "along two random x): w_bar does not belong with V, U, omega")
    return None


def _empty_weight(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised memory for V. On the CPU it is allocated by NumPy, which asks the kernel for transparent huge
    pages for arrays of 4 MiB or more (torch's allocator does only with ``THP_MEM_ALLOC_ENABLE=1``): a step reads
    and writes rows of V scattered over gigabytes, and on 4 KiB pages each of them costs a page walk. (A head
    converted by ``.to()`` or unpickled holds torch's allocation again: it works the same, a little slower.)"""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(shape, dtype=np.float32 if dtype == torch.float32 else np.float64))


def _float_dtype(dtype: Any, name: str) -> torch.dtype:
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be torch.float32 or torch.float64, got {dtype} (half-precision inputs are "
                        "accepted by forward; the weights are kept in float32 or float64)")
    return dtype


class FactoredLinear(nn.Module):
    """A linear output layer o = W h (+ b) with D = ``out_features`` outputs, trained exactly in O(d^2) per example.

    W is never stored: the module keeps W = V U + 1 omega^T (``V`` is out_features x in_features(+1), the rest is
    d x d) as plain tensor attributes, neither parameters nor buffers, so that ``DistributedDataParallel`` never
    broadcasts or all-reduces them; ``state_dict``, ``load_state_dict`` (all or nothing, checked), ``torch.save``,
    deepcopy and ``.to(dtype)`` work as for any module. Calling the
    module on hidden activations and targets returns a :class:`HeadOutput` (A, q, s): the outputs at the target
    entries, ||o||^2 and sum(o), all differentiable. Any loss of those trains the layer exactly through
    :class:`FactoredSGD`; the rest of the model uses any torch optimizer.

    Args:
        in_features: d, size of each input row.
        out_features: D, number of outputs.
        bias: add an output bias b, trained exactly (as an extra input fixed at 1; weight decay applies to it too).
        weight: initial W, (out_features, in_features) like ``nn.Linear.weight`` (copied). Default: uniform in
            [-1/sqrt(in_features), 1/sqrt(in_features)] like ``nn.Linear``.
        initial_bias: initial b, (out_features,), with ``bias=True`` (copied). Default: uniform like ``nn.Linear``.
        dtype: float32 or float64 (default ``torch.get_default_dtype()``).
        device: where the state lives: CPU, or a CUDA device when the CUDA backend is usable (see README).
        state_dtype: dtype of the small d x d state (default ``dtype``); float64 drifts less.
        sigma_range, inverse_tol, check_every, refresh_every, min_rcond: stabilisation policy, as in
            :class:`sparsetarget.FactoredOutput` (None: the default).
        vocab_parallel_group: a ``torch.distributed`` process group (None: not sharded). Each rank of the group
            keeps a contiguous block of the out_features rows of V (U, U^-1 and omega replicated) and every rank
            must see the same batch, as in tensor parallelism; ``weight`` and ``initial_bias`` are the full
            matrices on every rank. See the README, Distributed.

    dtypes of results, as in the NumPy API: A, q, s, logits, top-k values and log-probabilities are in the state
    dtype; the input's gradient is in the input's dtype (bfloat16/float16 inputs included); ``dense_weight`` is
    in ``dtype``.

    Only plain SGD with L2 weight decay keeps W in factored form (:class:`FactoredSGD`); momentum, Adam and other
    per-coordinate optimisers would need the dense D x d matrix and are refused. ``head.requires_grad_(False)``
    freezes the layer: gradients still flow to the input, nothing is recorded for the weights. The weights are not
    parameters, so a parent module's ``zero_grad()`` and ``requires_grad_()`` do not reach them: call the head's (or
    its ``FactoredSGD``'s ``zero_grad()``). ``torch.autograd.grad(loss, inputs)`` records nothing for the head, as
    it leaves dense weights' gradients alone.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 weight: torch.Tensor | None = None, initial_bias: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, state_dtype: torch.dtype | None = None,
                 sigma_range: tuple[float, float] | None = None, inverse_tol: float | None = None,
                 check_every: int | None = None, refresh_every: int | None = None,
                 min_rcond: float | None = None, vocab_parallel_group: Any = None) -> None:
        super().__init__()
        if check_int(in_features, "in_features") < 1 or check_int(out_features, "out_features") < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        dtype = _float_dtype(dtype, "dtype")
        state_dtype = _float_dtype(state_dtype if state_dtype is not None else dtype, "state_dtype")
        device = torch.device("cpu" if device is None else device)
        check_device(device, "FactoredLinear")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.has_bias = bool(bias)
        d = self.in_features + self.has_bias
        self._shard = None if vocab_parallel_group is None else VocabShard(vocab_parallel_group, self.out_features)
        start, stop = (0, self.out_features) if self._shard is None else (self._shard.start, self._shard.stop)
        V = _empty_weight((stop - start, d), dtype, device)
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            if weight is None:
                V[:, :self.in_features].uniform_(-bound, bound)
            else:
                self._check_init(weight, "weight", (self.out_features, self.in_features))
                V[:, :self.in_features].copy_(weight.detach()[start:stop])
            if initial_bias is not None and not self.has_bias:
                raise ValueError("initial_bias needs bias=True")
            if initial_bias is not None:
                self._check_init(initial_bias, "initial_bias", (self.out_features,))
                V[:, self.in_features].copy_(initial_bias.detach()[start:stop])
            elif self.has_bias:
                V[:, self.in_features].uniform_(-bound, bound)
        # Plain attributes, not buffers: DDP broadcasts buffers (and all-reduces parameters); this state is kept
        # identical across ranks by FactoredSGD(process_group=...) instead, from O(m d) per step.
        self.V = V
        sdt = np.float32 if state_dtype == torch.float32 else np.float64
        for name, array in initial_small_state(d, sdt).items():
            setattr(self, name, torch.from_numpy(array).to(device))
        self._stabilization: dict[str, Any] = {}
        self._view: Engine | None = None
        self._view_key: list[int] | None = None
        self._pending: list[Recorded] = []
        self._stale = False  # pending updates were applied and not yet cleared by zero_grad()
        self._voided: str | None = None  # what replaced the weights under recorded gradients (until zero_grad())
        self._version = 0  # bumped whenever the weights change
        self._owners: weakref.WeakSet[Any] = weakref.WeakSet()
        self._warned_unowned = False
        self._anchor = torch.zeros((), requires_grad=True)
        self._frozen = False
        self.set_stabilization(sigma_range=sigma_range, inverse_tol=inverse_tol, check_every=check_every,
                               refresh_every=refresh_every, min_rcond=min_rcond)
        self.refresh()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> FactoredLinear:
        """A factored head with the weight and bias of ``linear`` (same dtype and device unless given)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        kwargs.setdefault("dtype", linear.weight.dtype)
        kwargs.setdefault("device", linear.weight.device)
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None, weight=linear.weight,
                   initial_bias=linear.bias, **kwargs)

    @staticmethod
    def _check_init(value: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {shape}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {value.dtype}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contains NaN or inf")

    # ------------------------------------------------------------------ the core view of the state tensors
    def _state_tensors(self) -> list[torch.Tensor]:
        return list(_STATE_OF(self.__dict__))

    @property
    def vocab_rows(self) -> tuple[int, int]:
        """The rows [start, stop) of W this rank keeps: all of them unless the head is vocab parallel."""
        return (0, self.out_features) if self._shard is None else (self._shard.start, self._shard.stop)

    def _engine(self) -> Engine:
        """The backend working in place on the state tensors; rebuilt when one was replaced (e.g. by ``.to()``)."""
        tensors = _STATE_OF(self.__dict__)
        key = list(map(torch.Tensor.data_ptr, tensors))  # a new dtype, device or buffer means new memory
        view = self._view
        if view is None or key != self._view_key:
            view = self._view = engine_for(dict(zip(STATE_ARRAYS, tensors)), self._stabilization)
            self._view_key = key
        return view

    def _hidden(self, h: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """H (m, d) in the state dtype with the bias column, contiguous; ``h`` itself when nothing needs converting.
        Returns (H, owned): owned is False when H shares memory with h."""
        sdt = self.U.dtype
        if self.has_bias:
            H = torch.empty(h.shape[0], self.in_features + 1, dtype=sdt, device=h.device)
            H[:, :self.in_features] = h.detach()
            H[:, self.in_features] = 1
            return H, True
        if h.dtype is sdt and h.is_contiguous():
            return h.detach(), False
        return h.detach().to(sdt).contiguous(), True  # a converted or compacted copy

    def _input(self, input: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a tensor, got {type(input).__name__}")
        if not input.dtype.is_floating_point:
            raise TypeError(f"input must be floating point, got {input.dtype}")
        if input.dim() < 1 or input.shape[-1] != self.in_features:
            raise ValueError(f"input has shape {tuple(input.shape)}, expected (..., in_features={self.in_features})")
        if input.device != self.V.device:
            raise ValueError(f"input is on {input.device}, expected {self.V.device} like the head")
        lead = tuple(input.shape[:-1])
        h = input if len(lead) == 1 else input.reshape(-1, self.in_features)
        if h.shape[0] < 1:
            raise ValueError("input must have at least one row")
        return h, lead

    # ------------------------------------------------------------------ training
    def forward(self, input: torch.Tensor, target: Any, *, ignore_index: int = -100) -> HeadOutput:
        """(A, q, s) for ``input`` (..., in_features) and ``target``, differentiable with respect to the input.

        ``target``: class indices with the input's leading shape (``ignore_index`` rows are left out), or for a
        2-D input a sparse CSR tensor / (crow_indices, col_indices, values) tuple of shape (m, out_features).
        """
        h, call = self._call(input, target, ignore_index)
        if self._shard is None:
            A, q, s = FactoredHeadFunction.apply(h, self._anchor, call)
        else:
            A, q, s = VocabParallelHeadFunction.apply(h, self._anchor, call, self._shard)
        return HeadOutput(A, q, s, call.target)

    def _call(self, input: torch.Tensor, target: Any, ignore_index: int,
              engine: Engine | None = None) -> tuple[torch.Tensor, HeadCall]:
        """The input rows h (m, in_features) and what the autograd Function of one forward pass needs (``engine``:
        this head's, when the caller has it already)."""
        ignore_index = check_int(ignore_index, "ignore_index")
        h, lead = self._input(input)
        target_info = convert_target(target, lead, self.out_features, ignore_index, self.U.dtype, self.V.device)
        return h, self._head_call(h, target_info, engine or self._engine())

    def _head_call(self, h: torch.Tensor, target_info: Any, engine: Engine) -> HeadCall:
        """The HeadCall of checked input rows h (m, in_features) and their checked targets."""
        self._anchor.requires_grad_(not self._frozen)
        H, owned = self._hidden(h)
        return HeadCall(engine, target_info, H, owned, self._current_check(), self._record)

    def _fused_loss(self, input: torch.Tensor, target: Any, ignore_index: int, spec: Any,
                    reduction: str) -> torch.Tensor | None:
        """The built-in loss ``spec`` of this head's outputs as one autograd node, or None where the engine does not
        evaluate losses itself (a GPU, a vocab-parallel shard): then the loss is written in torch on (A, q, s)."""
        if self._shard is not None or not runs_plain_forward(self):
            return None
        engine = self._engine()
        if not engine.fuses_losses:
            return None
        call = self._plain_call(input, target, ignore_index, engine)
        if call is None:
            h, call = self._call(input, target, ignore_index, engine)
        else:
            h = input
        with_grad = torch.is_grad_enabled() and (h.requires_grad or self._anchor.requires_grad)
        return FactoredLossFunction.apply(h, self._anchor, call, spec, reduction, with_grad)

    def _plain_call(self, input: Any, target: Any, ignore_index: Any, engine: Engine) -> HeadCall | None:
        """What ``_call`` gives for its most common arguments in fewer steps (a training step's forward): an
        (m, in_features) floating-point CPU tensor and int64 class labels (m,) on the CPU. None for anything else,
        which ``_call`` then checks and converts (an input on another device than the head's among them)."""
        if (type(input) is not torch.Tensor or type(ignore_index) is not int or not input.is_cpu
                or not self.V.is_cpu or input.layout is not torch.strided or not input.dtype.is_floating_point):
            return None
        lead = input.shape[:-1]
        if len(lead) != 1 or input.shape[1] != self.in_features or lead[0] < 1:
            return None
        target_info = plain_class_target(target, tuple(lead), self.out_features, ignore_index, self.U.dtype)
        return None if target_info is None else self._head_call(input, target_info, engine)

    def _current_check(self) -> Callable[[], None]:
        """A check that raises once the weights changed after this call (for a backward of this forward)."""
        version = self._version

        def check_current() -> None:
            if self._version != version:
                raise RuntimeError(f"{self.__class__.__name__}'s weights changed (optimizer step, refresh, stabilize, "
                                   "load_state_dict or a device/dtype move) between this forward pass and its "
                                   "backward: the exact gradient needs the weights of the forward pass; run the "
                                   "forward again")

        return check_current

    def requires_grad_(self, requires_grad: bool = True) -> FactoredLinear:
        """``False`` freezes the layer: backward still gives the input's gradient but records no update."""
        self._frozen = not requires_grad
        return super().requires_grad_(requires_grad)

    def _record(self, update: Recorded) -> None:
        if self._voided:
            raise RuntimeError(self._void_message())
        if self._stale:
            raise RuntimeError("FactoredLinear: the gradients of the previous optimizer step were not cleared. Dense "
                               "SGD would apply them again, but the weights they were computed at are gone, so the "
                               "factored layer cannot: call zero_grad() on the FactoredSGD optimizer (or the head) "
                               "after each step()")
        if not self._owners:
            if not self._warned_unowned:
                self._warned_unowned = True
                warnings.warn(f"{self.__class__.__name__}(in_features={self.in_features}, out_features="
                              f"{self.out_features}) received a gradient but no FactoredSGD optimizer trains it, so "
                              "its weights will not change: create sparsetarget.torch.FactoredSGD(head, lr) (torch "
                              "optimizers cannot update the factored weight), or call head.requires_grad_(False) to "
                              "freeze it", RuntimeWarning, stacklevel=2)
            return
        self._pending.append(update)

    @property
    def pending_updates(self) -> int:
        """Number of backward passes recorded since the last ``zero_grad()`` and not yet applied."""
        return len(self._pending)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Discard recorded (or applied) gradients of this head, like ``Optimizer.zero_grad``."""
        super().zero_grad(set_to_none)
        self._discard_pending()

    def _discard_pending(self) -> None:
        self._pending.clear()
        # plain values: nn.Module.__setattr__'s checks cost more than the rest here
        self.__dict__.update(_stale=False, _voided=None)

    def _apply_pending(self, lr: float, weight_decay: float, process_group: Any = None) -> None:
        """One exact SGD step W <- (1 - lr wd) W - lr dL/dW with the gradients of all recorded backward passes
        (their sum, as for accumulated dense gradients). With ``process_group``, the recorded updates of every rank
        of the group, gathered and averaged (:func:`distributed.gather_update`), on every rank alike: a collective
        call. On error the weights and the pending list are unchanged. The caller has run :meth:`_check_step`."""
        if process_group is None:
            if not self._pending:
                return
            self._engine().step(self._pending, lr, weight_decay)
        else:
            update = gather_update(self._engine(), self._pending, process_group, self.U)
            if update is None:  # no rank recorded anything
                return
            self._engine().step([update], lr, weight_decay)
        self._pending.clear()
        self.__dict__.update(_stale=True, _version=self._version + 1)

    def _check_step(self) -> None:
        """Raise where a step of this head cannot be applied (recorded gradients voided, or already applied and not
        cleared); an optimizer checks every head so before :meth:`_apply_pending` steps any."""
        if self._voided:
            raise RuntimeError(self._void_message())
        if self._stale and not self._pending:
            raise RuntimeError("FactoredLinear: optimizer step() called again without zero_grad(): dense SGD would "
                               "apply the same gradients twice, which the factored layer cannot reproduce")

    @property
    def grad_anchor(self) -> torch.Tensor:
        """A scalar leaf standing for the head's weights in autograd, where they are not parameters: a plain
        ``backward()`` records the head's gradient; ``backward(inputs=[...])`` records it when the list holds this
        tensor (as it accumulates a parameter's gradient only when listed)."""
        return self._anchor

    def _changed(self, what: str | None = None) -> None:
        """The factorisation changed outside an optimizer step: forward passes before it are void. ``what`` None
        (refresh, stabilize: W is the same): recorded gradients stay valid, and the step recomputes what they kept
        of the old factorisation. Otherwise the weights were replaced (by ``what``): recorded gradients are void,
        and the next backward or step raises until zero_grad() discards them."""
        if what is None:
            self._pending = [update._replace(projections=None, grad_H=None) for update in self._pending]
        else:
            if self._pending:
                self._voided = what
            self._pending = []
            self._stale = False
        self._version += 1

    def _void_message(self) -> str:
        return (f"FactoredLinear: {self._voided} replaced the weights after backward() recorded gradients at the old "
                "ones. Dense SGD would apply those gradients to the new weights, but the factored layer keeps them "
                "in terms of the old weights and cannot: call zero_grad() to discard them (before the change, or "
                "now) and run the forward and backward again")

    # ------------------------------------------------------------------ module plumbing
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FactoredLinear:
        probe = fn(torch.empty(0, dtype=self.V.dtype, device=self.V.device))
        if probe.dtype not in FLOAT_DTYPES:
            raise TypeError(f"FactoredLinear keeps its weights in float32 or float64, not {probe.dtype}; use "
                            "autocast or half-precision inputs instead (they are accepted by forward)")
        check_device(probe.device, "FactoredLinear")
        before = [t.data_ptr() for t in self._state_tensors()]
        super()._apply(fn, recurse)
        for name in STATE_ARRAYS:  # the state tensors are not buffers: moved here
            t = fn(self.__dict__[name])
            if name == "stats":  # counters stay float64 whatever the weights' dtype
                t = t.to(torch.float64)
            self.__dict__[name] = t.contiguous()
        if [t.data_ptr() for t in self._state_tensors()] != before:
            self._changed("a device or dtype move")
        return self

    def __getstate__(self) -> dict[str, Any]:
        # For pickling and deepcopy: the core view is rebuilt on first use; recorded gradients and the optimizers
        # that own this head do not travel with a copy.
        state = dict(self.__dict__)
        state.update(_view=None, _view_key=None, _pending=[], _stale=False, _voided=None, _owners=None,
                     _warned_unowned=False)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._owners = weakref.WeakSet()
        self.__dict__.setdefault("_voided", None)

    def get_extra_state(self) -> dict[str, Any]:
        """Configuration saved with the state tensors in ``state_dict``."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.has_bias,
                "stabilization": dict(self._stabilization), "vocab_rows": list(self.vocab_rows)}

    def _extra_state_problem(self, state: Any) -> str | None:
        """Why the configuration ``state`` cannot be loaded into this head, or None."""
        try:
            shape = (state["in_features"], state["out_features"], state["bias"])
            stabilization = dict(state["stabilization"])
        except (TypeError, KeyError) as err:
            return f"its configuration entry is not a FactoredLinear configuration ({err!r})"
        if shape != (self.in_features, self.out_features, self.has_bias):
            return (f"state_dict is for (in_features, out_features, bias) = {shape}, this head is "
                    f"{(self.in_features, self.out_features, self.has_bias)}")
        rows = tuple(state.get("vocab_rows", (0, self.out_features)))
        if rows not in (self.vocab_rows, (0, self.out_features)):
            return (f"state_dict holds the rows {list(rows)} of W, this head keeps the rows {list(self.vocab_rows)}: "
                    "a block loads into the same rank of a vocab-parallel group of the same size; save "
                    "unsharded_state_dict() for a checkpoint that loads into any head")
        try:
            stabilization_updates(**stabilization)
        except (TypeError, ValueError) as err:
            return f"its stabilization options are invalid: {err}"
        return None

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the configuration saved by :meth:`get_extra_state`."""
        problem = self._extra_state_problem(state)
        if problem is not None:
            raise ValueError(problem)
        self.set_stabilization(**state["stabilization"])

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for name in STATE_ARRAYS:
            t = self.__dict__[name]
            destination[prefix + name] = t if keep_vars else t.detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    @torch.no_grad()
    def unsharded_state_dict(self) -> dict[str, Any]:
        """``state_dict()`` of the whole layer. A vocab-parallel head gathers V's rows and sums its blocks' Q_r and
        w_bar_r over the group (a collective: call it on every rank; each gets the whole state), for a checkpoint
        that loads into a head of any vocab-parallel group size, or none. Other heads: ``state_dict()``."""
        state = self.state_dict()
        if self._shard is None:
            return state
        state["V"] = self._shard.gather_rows(self.V)
        state["Q"] = self._shard.all_reduce(self.Q.clone())
        state["w_bar"] = self._shard.all_reduce(self.w_bar.clone())
        state[_EXTRA_STATE_KEY] = {**state[_EXTRA_STATE_KEY], "vocab_rows": [0, self.out_features]}
        return state

    def _loaded_state(self, state_dict: dict[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], bool]:
        """The factored state in ``state_dict`` checked (present, shapes, dtypes, finite, consistent) and converted
        to this head's dtypes and device, and whether it is a whole layer to be cut to this vocab-parallel head's
        block (whose Q and w_bar then come from a refresh). Raises RuntimeError naming the entry before anything
        changed."""

        def refuse(why: str) -> RuntimeError:
            return RuntimeError(f"Error(s) in loading state_dict for {self.__class__.__name__}: {why}; nothing of it "
                                "was loaded")

        missing = [prefix + name for name in STATE_ARRAYS if prefix + name not in state_dict]
        if missing:
            raise refuse(f"missing {', '.join(missing)}: W = V U + 1 omega^T and U_inv, Q, w_bar only make sense "
                         "together, so they load all together or not at all, whatever strict says")
        # torch hands every module strict=True and applies the caller's strict afterwards, when the head's state
        # would already be copied: so the configuration, which says what the tensors are, is required too.
        extra_key = prefix + _EXTRA_STATE_KEY
        if extra_key not in state_dict:
            raise refuse(f"missing {extra_key} (the head's configuration, saved by state_dict with the tensors)")
        problem = self._extra_state_problem(state_dict[extra_key])
        if problem is not None:
            raise refuse(problem)
        whole = tuple(state_dict[extra_key].get("vocab_rows", (0, self.out_features))) == (0, self.out_features)
        cut = self._shard is not None and whole
        loaded: dict[str, torch.Tensor] = {}
        for name in STATE_ARRAYS:
            key, given, own = prefix + name, state_dict[prefix + name], self.__dict__[name]
            if not isinstance(given, torch.Tensor):
                raise refuse(f"{key} is a {type(given).__name__}, expected a tensor")
            shape = (self.out_features, own.shape[1]) if cut and name == "V" else tuple(own.shape)
            if tuple(given.shape) != shape:
                raise refuse(f"{key} has shape {tuple(given.shape)} in the state_dict, this FactoredLinear has "
                             f"{shape}")
            if not given.dtype.is_floating_point:
                raise refuse(f"{key} has dtype {given.dtype}, expected a floating-point tensor")
            value = given.detach().to(device=own.device, dtype=own.dtype)
            if name != "stats" and not bool(torch.isfinite(value).all()):
                raise refuse(f"{key} contains NaN or inf")
            loaded[name] = value
        problem = _inconsistency(loaded)
        if problem is not None:
            raise refuse(problem)
        if cut:
            start, stop = self.vocab_rows
            loaded["V"] = loaded["V"][start:stop]
        return loaded, cut

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        # All or nothing: loading U but not V (say) would leave W = V U + 1 omega^T meaningless, so every check
        # runs before the first copy, and a refused state raises at once (whatever strict says).
        loaded, cut = self._loaded_state(state_dict, prefix)
        with torch.no_grad():
            for name, value in loaded.items():
                self.__dict__[name].copy_(value)  # in place: the core's view of the memory stays valid
        if cut:  # Q and w_bar of this block's rows (U U^-1 ~ I was checked: U is invertible)
            self._engine().refresh()
        ours = {prefix + name for name in STATE_ARRAYS}
        rest = {k: v for k, v in state_dict.items() if k not in ours}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._changed("load_state_dict")

    def extra_repr(self) -> str:
        shard = "" if self._shard is None else f", vocab_rows={list(self.vocab_rows)}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, "
                f"dtype={self.V.dtype}, state_dtype={self.U.dtype}{shard}")

    # ------------------------------------------------------------------ stabilisation
    def set_stabilization(self, **options: Any) -> None:
        """Change the stabilisation policy: ``sigma_range``, ``inverse_tol``, ``check_every``, ``refresh_every``,
        ``min_rcond`` (see :class:`sparsetarget.FactoredOutput`); options left out or None are unchanged."""
        unknown = set(options) - set(STABILIZATION_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown stabilization options {sorted(unknown)}; expected {list(STABILIZATION_DEFAULTS)}")
        given = {k: v for k, v in options.items() if v is not None}
        self._engine().set_stabilization(**given)  # checks them all first
        # kept as plain Python numbers (saved by get_extra_state: torch.load(weights_only=True) refuses NumPy scalars)
        self._stabilization.update({k: tuple(map(float, v)) if k == "sigma_range" else
                                    int(v) if k in ("check_every", "refresh_every") else float(v)
                                    for k, v in given.items()})

    def refresh(self) -> None:
        """Recompute U^-1, Q = W^T W and w_bar = W^T 1 from V, U, omega (O(D d^2); removes accumulated drift)."""
        self._engine().refresh()
        self._changed()

    def stabilize(self) -> dict[str, Any]:
        """Bring U's out-of-range singular values back to 1 now (one pass over V); W is unchanged."""
        report = self._engine().stabilize()
        self._changed()
        return report

    def diagnostics(self) -> dict[str, float]:
        """Health of the factorisation, as :meth:`sparsetarget.FactoredOutput.diagnostics`."""
        return self._engine().diagnostics()

    # ------------------------------------------------------------------ the dense layer, on demand
    def _full_weight(self) -> torch.Tensor:
        """[W b] with all D rows (a vocab-parallel head gathers the rows of every rank: a collective call)."""
        W = self._engine().dense_weight()
        return W if self._shard is None else self._shard.gather_rows(W)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """W as an (out_features, in_features) tensor (O(D d) memory: for checks and export). A vocab-parallel
        head gathers it from every rank of its group (call it on all of them) and returns it on each."""
        W = self._full_weight()
        return W[:, :self.in_features].contiguous() if self.has_bias else W

    @torch.no_grad()
    def dense_bias(self) -> torch.Tensor | None:
        """The bias (out_features,), or None without bias (gathered like :meth:`dense_weight`)."""
        if not self.has_bias:
            return None
        W = self._full_weight()
        return W[:, self.in_features].contiguous()

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weight and bias (same dtype and device), e.g. for deployment."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.has_bias, dtype=self.V.dtype,
                           device=self.V.device)
        W = self._full_weight()
        linear.weight.copy_(W[:, :self.in_features])
        if self.has_bias:
            linear.bias.copy_(W[:, self.in_features])
        return linear

    def _inference_input(self, input: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        h, lead = self._input(input)
        H, _ = self._hidden(h)
        return H, lead

    @torch.no_grad()
    def logits(self, input: torch.Tensor) -> torch.Tensor:
        """All D outputs W h (+ b) for ``input`` (..., in_features): (..., out_features), computed in tiles.
        Not differentiable (O(m D d)); train through the module call instead. A vocab-parallel head computes its
        own columns and gathers the others (call it on every rank of the group with the same input)."""
        H, lead = self._inference_input(input)
        logits = self._engine().logits(H)
        if self._shard is not None:
            logits = self._shard.gather_rows(logits, dim=1)
        return logits.reshape(*lead, self.out_features)

    @torch.no_grad()
    def topk(self, input: torch.Tensor, k: int, *, by: str = "output", kind: str = "spherical_softmax",
             eps: float = _EPS) -> torch.return_types.topk:
        """The k best outputs of each row, ``(values, indices)`` each (..., k), best first, like ``torch.topk``,
        without materialising the (m, D) outputs.

        ``by="output"`` ranks by the output o and returns the outputs. ``by="probability"`` ranks by the
        probability of ``kind`` (``"spherical_softmax"`` with ``eps``: p ~ o^2 + eps; ``"taylor_softmax"``:
        p ~ 1 + o + o^2/2) and returns exact log-probabilities, as :meth:`log_prob` would give. A vocab-parallel
        head ranks its own rows and merges the candidates of every rank (a collective call)."""
        H, lead = self._inference_input(input)
        k = check_int(k, "k")
        if self._shard is None:
            values, indices = self._engine().topk(H, k, by, kind, eps)
        else:
            if by == "probability":
                kind, eps = check_distribution(kind, eps)
            values, indices = self._shard.topk(self._engine(), H, k, by, kind, eps)
        return torch.return_types.topk((values.reshape(*lead, -1), indices.reshape(*lead, -1)))

    def synchronize(self) -> None:
        """Wait for the head's queued GPU work and raise the error of a failed step at once (on a GPU such errors
        are otherwise reported by the next call on the head; see the class docstring). No-op on the CPU."""
        self._engine().synchronize()

    def log_prob(self, input: torch.Tensor, target: Any, kind: str = "spherical_softmax", *,
                 eps: float = _EPS, ignore_index: int = -100) -> torch.Tensor:
        """Exact log-probabilities of the target entries under ``kind`` = ``"spherical_softmax"`` (with ``eps``)
        or ``"taylor_softmax"``, in O(d^2) per example: the normaliser comes from the factored state, never
        from the D outputs. Shaped like ``HeadOutput.A`` (0 on ignored rows), in the state dtype; differentiable."""
        kind, eps = check_distribution(kind, eps)
        out = self(input, target, ignore_index=ignore_index)
        t = out.target
        return log_prob_of_entries(kind, out.A, out.q, out.s, t.rows, t.valid, t.out_features, eps)


_STATE_OF = operator.itemgetter(*STATE_ARRAYS)  # the state tensors from a head's __dict__

# Hook dictionaries of torch.nn (registering a hook adds to them; torch never replaces them). None where this torch
# has no such dictionary: then no loss skips a head's call.
_GLOBAL_HOOK_DICTS = tuple(getattr(nn.modules.module, name, None) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


def runs_plain_forward(head: FactoredLinear) -> bool:
    """True when calling ``head`` would run ``FactoredLinear.forward`` and nothing else: no forward or backward hooks
    (the head's own or global ones), no tracing, no compiled call. Only then may a loss skip the call (any doubt,
    e.g. an unknown torch, answers False)."""
    own = head.__dict__
    for hooks in (*_GLOBAL_HOOK_DICTS, own.get("_forward_hooks"), own.get("_forward_pre_hooks"),
                  own.get("_backward_hooks"), own.get("_backward_pre_hooks")):
        if hooks is None or hooks:
            return False
    return (type(head).forward is FactoredLinear.forward and own.get("_compiled_call_impl") is None
            and not torch._C._get_tracing_state())


class LinearSphericalLoss(nn.Module):
    """Module form of :func:`linear_spherical_loss`: holds the loss, its options, ``reduction`` and
    ``ignore_index``; ``forward(input, head, target)``."""

    def __init__(self, loss: str = "spherical_softmax", *, reduction: str = "mean", ignore_index: int = -100,
                 **loss_options: float) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self._fn = loss_function(loss, loss_options)
        self.loss = loss
        self.loss_options = dict(loss_options)
        self.reduction = reduction
        self.ignore_index = check_int(ignore_index, "ignore_index")

    def forward(self, input: torch.Tensor, head: FactoredLinear, target: Any) -> torch.Tensor:
        """The loss of ``head`` on ``input`` and ``target`` (see :func:`linear_spherical_loss`)."""
        return self._fn.of_head(input, head, target, self.reduction, self.ignore_index)

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v}" for k, v in self.loss_options.items())
        return f"loss={self.loss!r}{opts}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"
