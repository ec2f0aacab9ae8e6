"""``FactoredLinear``, the exact factored output layer as an ``nn.Module``, and ``LinearSphericalLoss``."""

from __future__ import annotations

import math
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
    Engine,
    Recorded,
    check_device,
    check_distribution,
    engine_for,
    initial_small_state,
    log_prob_of_entries,
)
from ._function import FactoredHeadFunction, HeadCall
from ._target import convert_target
from .functional import REDUCTIONS, HeadOutput, loss_function

FLOAT_DTYPES = (torch.float32, torch.float64)
_EPS = LOSS_OPTIONS["spherical_softmax"]["eps"]


def _float_dtype(dtype: Any, name: str) -> torch.dtype:
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be torch.float32 or torch.float64, got {dtype} (half-precision inputs are "
                        "accepted by forward; the weights are kept in float32 or float64)")
    return dtype


class FactoredLinear(nn.Module):
    """A linear output layer o = W h (+ b) with D = ``out_features`` outputs, trained exactly in O(d^2) per example.

    W is never stored: the module keeps W = V U + 1 omega^T as buffers (``V`` is out_features x in_features(+1),
    the rest is d x d), so ``state_dict``, ``torch.save`` and ``.to(dtype)`` work as for any module. Calling the
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

    dtypes of results, as in the NumPy API: A, q, s, logits, top-k values and log-probabilities are in the state
    dtype; the input's gradient is in the input's dtype (bfloat16/float16 inputs included); ``dense_weight`` is
    in ``dtype``.

    Only plain SGD with L2 weight decay keeps W in factored form (:class:`FactoredSGD`); momentum, Adam and other
    per-coordinate optimisers would need the dense D x d matrix and are refused. ``head.requires_grad_(False)``
    freezes the layer: gradients still flow to the input, nothing is recorded for the weights.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 weight: torch.Tensor | None = None, initial_bias: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, state_dtype: torch.dtype | None = None,
                 sigma_range: tuple[float, float] | None = None, inverse_tol: float | None = None,
                 check_every: int | None = None, refresh_every: int | None = None,
                 min_rcond: float | None = None) -> None:
        super().__init__()
        if int(in_features) < 1 or int(out_features) < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        dtype = _float_dtype(dtype, "dtype")
        state_dtype = _float_dtype(state_dtype if state_dtype is not None else dtype, "state_dtype")
        device = torch.device("cpu" if device is None else device)
        check_device(device, "FactoredLinear")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.has_bias = bool(bias)
        d = self.in_features + self.has_bias
        V = torch.empty(self.out_features, d, dtype=dtype, device=device)
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            if weight is None:
                V[:, :self.in_features].uniform_(-bound, bound)
            else:
                self._check_init(weight, "weight", (self.out_features, self.in_features))
                V[:, :self.in_features].copy_(weight.detach())
            if initial_bias is not None and not self.has_bias:
                raise ValueError("initial_bias needs bias=True")
            if initial_bias is not None:
                self._check_init(initial_bias, "initial_bias", (self.out_features,))
                V[:, self.in_features].copy_(initial_bias.detach())
            elif self.has_bias:
                V[:, self.in_features].uniform_(-bound, bound)
        self.register_buffer("V", V)
        sdt = np.float32 if state_dtype == torch.float32 else np.float64
        for name, array in initial_small_state(d, sdt).items():
            self.register_buffer(name, torch.from_numpy(array).to(device))
        self._stabilization: dict[str, Any] = {}
        self._view: Engine | None = None
        self._view_key: list[int] | None = None
        self._pending: list[Recorded] = []
        self._stale = False  # pending updates were applied and not yet cleared by zero_grad()
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

    # ------------------------------------------------------------------ the core view of the buffers
    def _state_tensors(self) -> list[torch.Tensor]:
        buffers = self._buffers
        return [buffers[name] for name in STATE_ARRAYS]

    def _engine(self) -> Engine:
        """The backend working in place on the buffers; rebuilt when a buffer was replaced (e.g. by ``.to()``)."""
        tensors = self._state_tensors()
        key = [t.data_ptr() for t in tensors]  # a new dtype, device or buffer means new memory
        if self._view is None or key != self._view_key:
            self._view = engine_for(dict(zip(STATE_ARRAYS, tensors)), self._stabilization)
            self._view_key = key
        return self._view

    def _hidden(self, h: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """H (m, d) in the state dtype with the bias column, contiguous; ``h`` itself when nothing needs converting.
        Returns (H, owned): owned is False when H shares memory with h."""
        sdt = self.U.dtype
        if self.has_bias:
            H = torch.empty(h.shape[0], self.in_features + 1, dtype=sdt, device=h.device)
            H[:, :self.in_features] = h.detach()
            H[:, self.in_features] = 1
            return H, True
        H = h.detach().to(sdt).contiguous()
        return H, H.data_ptr() != h.data_ptr()

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
        h = input.reshape(-1, self.in_features)
        if h.shape[0] < 1:
            raise ValueError("input must have at least one row")
        return h, lead

    # ------------------------------------------------------------------ training
    def forward(self, input: torch.Tensor, target: Any, *, ignore_index: int = -100) -> HeadOutput:
        """(A, q, s) for ``input`` (..., in_features) and ``target``, differentiable with respect to the input.

        ``target``: class indices with the input's leading shape (``ignore_index`` rows are left out), or for a
        2-D input a sparse CSR tensor / (crow_indices, col_indices, values) tuple of shape (m, out_features).
        """
        if not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        h, lead = self._input(input)
        target_info = convert_target(target, lead, self.out_features, ignore_index, self.U.dtype, self.V.device)
        self._anchor.requires_grad_(not self._frozen)
        H, owned = self._hidden(h)
        call = HeadCall(self._engine(), target_info, H, owned, self._current_check(), self._record)
        A, q, s = FactoredHeadFunction.apply(h, self._anchor, call)
        return HeadOutput(A, q, s, target_info)

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
        self._pending.clear()
        self._stale = False

    def _apply_pending(self, lr: float, weight_decay: float) -> None:
        """One exact SGD step W <- (1 - lr wd) W - lr dL/dW with the gradients of all recorded backward passes
        (their sum, as for accumulated dense gradients). On error the weights and the pending list are unchanged."""
        if self._stale and not self._pending:
            raise RuntimeError("FactoredLinear: optimizer step() called again without zero_grad(): dense SGD would "
                               "apply the same gradients twice, which the factored layer cannot reproduce")
        if not self._pending:
            return
        self._engine().step(self._pending, lr, weight_decay)
        self._pending = []
        self._stale = True
        self._version += 1

    def _changed(self) -> None:
        """The weights changed outside an optimizer step: recorded gradients and forward passes are void."""
        self._pending = []
        self._stale = False
        self._version += 1

    # ------------------------------------------------------------------ module plumbing
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FactoredLinear:
        probe = fn(torch.empty(0, dtype=self.V.dtype, device=self.V.device))
        if probe.dtype not in FLOAT_DTYPES:
            raise TypeError(f"FactoredLinear keeps its weights in float32 or float64, not {probe.dtype}; use "
                            "autocast or half-precision inputs instead (they are accepted by forward)")
        check_device(probe.device, "FactoredLinear")
        before = [t.data_ptr() for t in self._state_tensors()]
        super()._apply(fn, recurse)
        if self.stats.dtype != torch.float64:  # counters stay float64 whatever the weights' dtype
            self.stats = self.stats.to(torch.float64)
        for name in STATE_ARRAYS:
            t = getattr(self, name)
            if not t.is_contiguous():
                setattr(self, name, t.contiguous())
        if [t.data_ptr() for t in self._state_tensors()] != before:
            self._changed()
        return self

    def __getstate__(self) -> dict[str, Any]:
        # For pickling and deepcopy: the core view is rebuilt on first use; recorded gradients and the optimizers
        # that own this head do not travel with a copy.
        state = dict(self.__dict__)
        state.update(_view=None, _view_key=None, _pending=[], _stale=False, _owners=None, _warned_unowned=False)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._owners = weakref.WeakSet()

    def get_extra_state(self) -> dict[str, Any]:
        """Configuration saved with the buffers in ``state_dict``."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.has_bias,
                "stabilization": dict(self._stabilization)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the configuration saved by :meth:`get_extra_state`."""
        shape = (state["in_features"], state["out_features"], state["bias"])
        if shape != (self.in_features, self.out_features, self.has_bias):
            raise ValueError(f"state_dict is for (in_features, out_features, bias) = {shape}, this head is "
                             f"{(self.in_features, self.out_features, self.has_bias)}")
        self.set_stabilization(**state["stabilization"])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        # All or nothing: loading U but not V (say) would leave W = V U + 1 omega^T meaningless.
        for name in STATE_ARRAYS:
            given = state_dict.get(prefix + name)
            own = getattr(self, name)
            if isinstance(given, torch.Tensor) and tuple(given.shape) != tuple(own.shape):
                error_msgs.append(f"{prefix}{name} has shape {tuple(given.shape)} in the state_dict, this "
                                  f"FactoredLinear has {tuple(own.shape)}: nothing of it was loaded")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._changed()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, "
                f"dtype={self.V.dtype}, state_dtype={self.U.dtype}")

    # ------------------------------------------------------------------ stabilisation
    def set_stabilization(self, **options: Any) -> None:
        """Change the stabilisation policy: ``sigma_range``, ``inverse_tol``, ``check_every``, ``refresh_every``,
        ``min_rcond`` (see :class:`sparsetarget.FactoredOutput`); options left out or None are unchanged."""
        unknown = set(options) - set(STABILIZATION_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown stabilization options {sorted(unknown)}; expected {list(STABILIZATION_DEFAULTS)}")
        given = {k: v for k, v in options.items() if v is not None}
        self._engine().set_stabilization(**given)  # checks them all first
        self._stabilization.update(given)

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
    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """W as an (out_features, in_features) tensor (O(D d) memory: for checks and export)."""
        W = self._engine().dense_weight()
        return W[:, :self.in_features].contiguous() if self.has_bias else W

    @torch.no_grad()
    def dense_bias(self) -> torch.Tensor | None:
        """The bias (out_features,), or None without bias."""
        if not self.has_bias:
            return None
        W = self._engine().dense_weight()
        return W[:, self.in_features].contiguous()

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weight and bias (same dtype and device), e.g. for deployment."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.has_bias, dtype=self.V.dtype,
                           device=self.V.device)
        W = self._engine().dense_weight()
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
        Not differentiable (O(m D d)); train through the module call instead."""
        H, lead = self._inference_input(input)
        return self._engine().logits(H).reshape(*lead, self.out_features)

    @torch.no_grad()
    def topk(self, input: torch.Tensor, k: int, *, by: str = "output", kind: str = "spherical_softmax",
             eps: float = _EPS) -> torch.return_types.topk:
        """The k best outputs of each row, ``(values, indices)`` each (..., k), best first, like ``torch.topk``,
        without materialising the (m, D) outputs.

        ``by="output"`` ranks by the output o and returns the outputs. ``by="probability"`` ranks by the
        probability of ``kind`` (``"spherical_softmax"`` with ``eps``: p ~ o^2 + eps; ``"taylor_softmax"``:
        p ~ 1 + o + o^2/2) and returns exact log-probabilities, as :meth:`log_prob` would give."""
        H, lead = self._inference_input(input)
        values, indices = self._engine().topk(H, int(k), by, kind, eps)
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
        self.ignore_index = int(ignore_index)

    def forward(self, input: torch.Tensor, head: FactoredLinear, target: Any) -> torch.Tensor:
        """The loss of ``head`` on ``input`` and ``target`` (see :func:`linear_spherical_loss`)."""
        return self._fn(head(input, target, ignore_index=self.ignore_index), self.reduction)

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v}" for k, v in self.loss_options.items())
        return f"loss={self.loss!r}{opts}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"
