"""NumPy API: :class:`FactoredOutput`, an exactly trained D x d output layer kept as W = V U + 1 omega^T."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from . import _core
from ._targets import CSRTargets, to_csr

LOSS_OPTIONS: dict[str, dict[str, float]] = {
    "squared_error": {},
    "spherical_softmax": {"eps": 1e-2},
    "taylor_softmax": {},
    "z_loss": {"a": 0.1, "b": 10.0},
}
"""The built-in losses and the default value of each of their options."""

STATE_ARRAYS = ("V", "U", "U_inv", "Q", "omega", "w_bar", "probe_max", "probe_min", "stats")
"""Names of the state arrays, in the order the core takes them."""
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _float_dtype(dtype: Any, name: str) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt


def _check_scalar(x: Any, name: str) -> float:
    try:
        value = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}") from None
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def loss_spec(loss: str, options: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """Check a built-in loss name and its options (names and domains); return the core's spec and the options
    with defaults filled in."""
    if loss not in LOSS_OPTIONS:
        raise ValueError(f"loss must be one of {sorted(LOSS_OPTIONS)}, got {loss!r}")
    allowed = LOSS_OPTIONS[loss]
    unknown = set(options) - set(allowed)
    if unknown:
        raise TypeError(f"loss {loss!r} takes options {sorted(allowed) or 'none'}, got {sorted(unknown)}")
    resolved = {**allowed, **{k: float(v) for k, v in options.items()}}
    defaults = {**LOSS_OPTIONS["spherical_softmax"], **LOSS_OPTIONS["z_loss"], **resolved}
    spec = _core.make_loss_spec(loss, defaults["eps"], defaults["a"], defaults["b"])
    return spec, resolved


def initial_small_state(d: int, state_dtype: Any) -> dict[str, np.ndarray]:
    """The d x d state of W = V (U = U^-1 = I, omega = 0; Q and w_bar are filled by a refresh), the fixed
    monitoring vectors and the counters."""
    sdt = np.dtype(state_dtype)
    rng = np.random.default_rng(12345)  # fixed monitoring vectors: runs are reproducible
    probe_max = rng.standard_normal(d)
    probe_min = rng.standard_normal(d)
    stats = np.zeros(_core.STATS_SIZE)
    stats[int(_core.Stat.sigma_max)] = stats[int(_core.Stat.sigma_min)] = 1.0
    return {
        "U": np.eye(d, dtype=sdt),
        "U_inv": np.eye(d, dtype=sdt),
        "Q": np.zeros((d, d), dtype=sdt),
        "omega": np.zeros(d, dtype=sdt),
        "w_bar": np.zeros(d, dtype=sdt),
        "probe_max": (probe_max / np.linalg.norm(probe_max)).astype(sdt),
        "probe_min": (probe_min / np.linalg.norm(probe_min)).astype(sdt),
        "stats": stats,
    }


def stabilization_updates(
    *,
    sigma_range: tuple[float, float] | None = None,
    inverse_tol: float | None = None,
    check_every: int | None = None,
    refresh_every: int | None = None,
    min_rcond: float | None = None,
) -> dict[str, Any]:
    """Check a stabilisation policy and return it as the core's attributes (``sigma_low``, ``sigma_high``,
    ``inverse_tol``, ``check_every``, ``refresh_every``, ``min_rcond``); None means unchanged."""
    updates: dict[str, Any] = {}
    if sigma_range is not None:
        low, high = (float(x) for x in sigma_range)
        if not (0 < low < 1 < high) or not np.isfinite(high):
            raise ValueError(f"sigma_range must satisfy 0 < low < 1 < high, got {sigma_range}")
        updates["sigma_low"], updates["sigma_high"] = low, high
    if inverse_tol is not None:
        if not (float(inverse_tol) > 0):
            raise ValueError(f"inverse_tol must be > 0, got {inverse_tol}")
        updates["inverse_tol"] = float(inverse_tol)
    if check_every is not None:
        if int(check_every) < 0:
            raise ValueError(f"check_every must be >= 0, got {check_every}")
        updates["check_every"] = int(check_every)
    if refresh_every is not None:
        if int(refresh_every) < 0:
            raise ValueError(f"refresh_every must be >= 0, got {refresh_every}")
        updates["refresh_every"] = int(refresh_every)
    if min_rcond is not None:
        if not (0 <= float(min_rcond) < 1):
            raise ValueError(f"min_rcond must be in [0, 1), got {min_rcond}")
        updates["min_rcond"] = float(min_rcond)
    return updates


def log_prob_of_outputs(kind: str, O: Any, q: Any, s: Any, num_outputs: int, eps: float) -> Any:
    """log p of outputs O under spherical (``eps``) or Taylor softmax, given the rows' q = ||o||^2 and s = sum(o)
    broadcast like O (NumPy arrays or torch tensors)."""
    xp = np if isinstance(O, np.ndarray) else _torch_module()
    D = float(num_outputs)
    if kind == "spherical_softmax":
        return xp.log(O * O + eps) - xp.log(q + D * eps)
    return xp.log1p(O + 0.5 * O * O) - xp.log(D + s + 0.5 * q)


def _torch_module() -> Any:
    import torch  # only reached with torch tensors, so the NumPy API never imports torch itself

    return torch


def diagnostics_from(stats: np.ndarray, U: np.ndarray, inverse_error: float) -> dict[str, float]:
    """The diagnostics dict of a layer from its monitoring scalars, U and ||U U^-1 - I||_F."""
    S = _core.Stat
    sv = np.linalg.svd(np.asarray(U, dtype=np.float64), compute_uv=False)
    return {
        "condition": float(sv[0] / sv[-1]) if sv[-1] > 0 else float("inf"),
        "sigma_max": float(sv[0]),
        "sigma_min": float(sv[-1]),
        "inverse_error": float(inverse_error),
        "monitor_sigma_max": float(stats[int(S.sigma_max)]),
        "monitor_sigma_min": float(stats[int(S.sigma_min)]),
        "monitor_residual": float(stats[int(S.inverse_residual)]),
        "steps": int(stats[int(S.steps)]),
        "corrections": int(stats[int(S.corrections)]),
        "corrected_values": int(stats[int(S.corrected_values)]),
        "refreshes": int(stats[int(S.refreshes)]),
    }


class FactoredOutput:
    """A D x d linear output layer o = W h trained by exact SGD in O(m d^2 + nnz d) per minibatch.

    The dense W is never stored: the layer keeps W = V U + 1 omega^T with V (D x d) in the weight's dtype and the
    small d x d state (U, U^-1, Q = W^T W, omega, w_bar = W^T 1) in ``state_dtype``. Every method gives the same
    numbers, up to rounding, as the dense layer would.

    Args:
        weight: initial W, a (D, d) float32 or float64 array (copied).
        loss: built-in loss used by :meth:`loss` and :meth:`step`: ``"squared_error"`` (||o - y||^2),
            ``"spherical_softmax"`` (option ``eps``), ``"taylor_softmax"`` or ``"z_loss"`` (options ``a``, ``b``).
        state_dtype: dtype of the d x d state, float32 or float64; default the weight's dtype. float64 drifts
            less; float32 is about twice as fast.
        ignore_index: class label whose rows contribute no loss, no gradient and no update.
        sigma_range: (low, high): U's singular values may spread by high / low (default 4) around their geometric
            mean s; beyond that a correction brings every value outside s (sqrt(low), sqrt(high)) back to s in one
            pass over V. A uniform scale of U is free; when s drifts beyond 2^+-24, one O(D d) pass resets it to 1.
        inverse_tol: tolerated ||U U^-1 x - x|| / ||x|| on the monitoring vector before U^-1 is rebuilt.
        check_every: steps between O(d^2) monitoring checks (0 disables monitoring and corrections).
        refresh_every: steps between full O(D d^2) refreshes of U^-1, Q and w_bar (0: never, the default).
        min_rcond: a step whose factor M = (1 - lr wd) I - lr H^T diag(2 dL/dq) H has a reciprocal condition
            number below this is refused (default sqrt of the state dtype's machine epsilon).
        **loss_options: options of ``loss`` (see :data:`LOSS_OPTIONS` for defaults).
    """

    def __init__(
        self,
        weight: np.ndarray,
        *,
        loss: str = "squared_error",
        state_dtype: Any = None,
        ignore_index: int = -100,
        sigma_range: tuple[float, float] = (0.5, 2.0),
        inverse_tol: float = 1e-3,
        check_every: int = 1,
        refresh_every: int = 0,
        min_rcond: float | None = None,
        **loss_options: float,
    ) -> None:
        w = np.asarray(weight)
        if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
            raise ValueError(f"weight must be a non-empty (D, d) array, got shape {w.shape}")
        dtype = _float_dtype(w.dtype, "weight")
        if not np.all(np.isfinite(w)):
            raise ValueError("weight contains NaN or inf")
        V = np.array(w, dtype=dtype, order="C", copy=True)
        self._setup(V, state_dtype=state_dtype, loss=loss, loss_options=loss_options, ignore_index=ignore_index,
                    sigma_range=sigma_range, inverse_tol=inverse_tol, check_every=check_every,
                    refresh_every=refresh_every, min_rcond=min_rcond)
        self._core.refresh()

    @classmethod
    def random(
        cls,
        num_outputs: int,
        hidden_size: int,
        *,
        dtype: Any = np.float32,
        seed: int | None = 0,
        scale: float | None = None,
        **kwargs: Any,
    ) -> FactoredOutput:
        """A layer with W drawn uniformly from [-scale, scale] (default 1/sqrt(d), as torch.nn.Linear), seeded.

        ``kwargs`` are the constructor's keyword arguments (loss, state_dtype, loss options, ...).
        """
        if int(num_outputs) < 1 or int(hidden_size) < 1:
            raise ValueError(f"num_outputs and hidden_size must be >= 1, got {num_outputs}, {hidden_size}")
        dt = _float_dtype(dtype, "dtype")
        bound = 1.0 / np.sqrt(hidden_size) if scale is None else _check_scalar(scale, "scale")
        rng = np.random.default_rng(seed)
        V = np.empty((int(num_outputs), int(hidden_size)), dtype=dt)
        rows = max(1, (1 << 22) // int(hidden_size))
        for start in range(0, V.shape[0], rows):  # fill in blocks: no float64 copy of the whole matrix
            block = V[start:start + rows]
            block[...] = rng.uniform(-bound, bound, size=block.shape)
        layer = cls.__new__(cls)
        layer._setup(V, **kwargs)
        layer._core.refresh()
        return layer

    def _setup(
        self,
        V: np.ndarray,
        *,
        state_dtype: Any = None,
        **config: Any,
    ) -> None:
        """Take ownership of V (C-contiguous) and set up the state for W = V; the caller then runs refresh()."""
        sdt = V.dtype if state_dtype is None else _float_dtype(state_dtype, "state_dtype")
        self._attach({"V": V, **initial_small_state(V.shape[1], sdt)}, **config)

    @classmethod
    def _wrap(cls, arrays: dict[str, np.ndarray], **config: Any) -> FactoredOutput:
        """A layer working in place on existing state arrays (e.g. views of torch tensors); nothing is copied."""
        layer = cls.__new__(cls)
        layer._attach(dict(arrays), **config)
        return layer

    def _attach(
        self,
        arrays: dict[str, np.ndarray],
        *,
        loss: str = "squared_error",
        loss_options: dict[str, Any] | None = None,
        ignore_index: int = -100,
        sigma_range: tuple[float, float] = (0.5, 2.0),
        inverse_tol: float = 1e-3,
        check_every: int = 1,
        refresh_every: int = 0,
        min_rcond: float | None = None,
        **more_loss_options: float,
    ) -> None:
        loss_options = {**(loss_options or {}), **more_loss_options}
        self._spec, self._loss_options = loss_spec(loss, loss_options)
        self._loss = loss
        if not isinstance(ignore_index, (int, np.integer)):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.ignore_index = int(ignore_index)
        self._arrays = arrays
        self._core = _core.FactoredCore(*(arrays[k] for k in STATE_ARRAYS))
        self.set_stabilization(sigma_range=sigma_range, inverse_tol=inverse_tol, check_every=check_every,
                               refresh_every=refresh_every, min_rcond=min_rcond)

    # ------------------------------------------------------------------ configuration and properties
    def set_stabilization(
        self,
        *,
        sigma_range: tuple[float, float] | None = None,
        inverse_tol: float | None = None,
        check_every: int | None = None,
        refresh_every: int | None = None,
        min_rcond: float | None = None,
    ) -> None:
        """Change the stabilisation policy (see the class docstring); arguments left as None are unchanged.
        All arguments are checked before any is applied."""
        updates = stabilization_updates(sigma_range=sigma_range, inverse_tol=inverse_tol, check_every=check_every,
                                        refresh_every=refresh_every, min_rcond=min_rcond)
        for name, value in updates.items():
            setattr(self._core, name, value)

    @property
    def num_outputs(self) -> int:
        """D, the number of outputs (rows of W)."""
        return self._arrays["V"].shape[0]

    @property
    def hidden_size(self) -> int:
        """d, the number of inputs (columns of W)."""
        return self._arrays["V"].shape[1]

    @property
    def dtype(self) -> np.dtype:
        """dtype of V and of :meth:`weight`."""
        return self._arrays["V"].dtype

    @property
    def state_dtype(self) -> np.dtype:
        """dtype of the d x d state and of the computations on it."""
        return self._arrays["U"].dtype

    @property
    def loss_name(self) -> str:
        """Name of the built-in loss used by :meth:`loss` and :meth:`step`."""
        return self._loss

    @property
    def loss_options(self) -> dict[str, float]:
        """Options of the built-in loss, defaults filled in."""
        return dict(self._loss_options)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v}" for k, v in self._loss_options.items())
        return (f"FactoredOutput(D={self.num_outputs}, d={self.hidden_size}, dtype={self.dtype}, "
                f"state_dtype={self.state_dtype}, loss={self._loss!r}{opts})")

    # ------------------------------------------------------------------ input checks
    def _hidden(self, H: Any) -> tuple[np.ndarray, np.dtype]:
        arr = np.asarray(H)
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"H must be a floating-point array, got dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[1] != self.hidden_size or arr.shape[0] < 1:
            raise ValueError(f"H has shape {arr.shape}, expected (m, d) with m >= 1 and d = {self.hidden_size}")
        out_dtype = arr.dtype if arr.dtype in _FLOAT_DTYPES else self.state_dtype
        return np.ascontiguousarray(arr, dtype=self.state_dtype), out_dtype

    def _targets(self, targets: Any, m: int) -> CSRTargets:
        return to_csr(targets, m, self.num_outputs, self.ignore_index)

    # ------------------------------------------------------------------ training
    def loss(self, H: np.ndarray, targets: Any) -> np.ndarray:
        """Per-example losses (m,) in float64 of the built-in loss at the current weights; no state change."""
        h, _ = self._hidden(H)
        t = self._targets(targets, h.shape[0])
        return self._core.loss(h, t.indptr, t.indices, t.values, t.active, self._spec)

    def step(self, H: np.ndarray, targets: Any, lr: float, weight_decay: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """One exact SGD step on the summed built-in loss sum_j L_j, with L2 weight decay (torch.optim.SGD rule).

        W <- (1 - lr * weight_decay) W - lr * dL/dW. Returns ``(losses, grad_H)``: the per-example losses (m,) and
        dL/dH (m, d), both at the weights before the step. On any error the layer is unchanged.
        """
        lr = _check_scalar(lr, "lr")
        weight_decay = _check_scalar(weight_decay, "weight_decay")
        h, out_dtype = self._hidden(H)
        t = self._targets(targets, h.shape[0])
        losses, grad_h = self._core.step(h, t.indptr, t.indices, t.values, t.active, self._spec, lr, weight_decay)
        return losses, grad_h.astype(out_dtype, copy=False)

    def forward(self, H: np.ndarray, targets: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The spherical-family quantities ``(A, q, s)`` at the current weights, in O(m d^2 + nnz d).

        A: the outputs at the target entries: (m,) for class labels (NaN on ignored rows), (nnz,) in the targets'
        CSR order for sparse targets; q = ||o||^2 (m,); s = sum(o) (m,).
        """
        h, _ = self._hidden(H)
        t = self._targets(targets, h.shape[0])
        A, q, s = self._core.forward(h, t.indptr, t.indices)
        if t.is_class and t.active is not None:
            full = np.full(h.shape[0], np.nan, dtype=A.dtype)
            full[t.active.astype(bool)] = A
            A = full
        return A, q, s

    def backward_step(self, H: np.ndarray, targets: Any, dA: np.ndarray, dq: np.ndarray, ds: np.ndarray, lr: float,
                      weight_decay: float = 0.0) -> np.ndarray:
        """Exact SGD step for any loss of (A, q, s) whose partial derivatives the caller computed.

        ``dA``, ``dq``, ``ds`` are dL/dA, dL/dq, dL/ds with the shapes :meth:`forward` returns (entries of ignored
        class rows are not used). Returns grad_H = dL/dH at the weights before the step.
        """
        lr = _check_scalar(lr, "lr")
        weight_decay = _check_scalar(weight_decay, "weight_decay")
        h, out_dtype = self._hidden(H)
        m = h.shape[0]
        t = self._targets(targets, m)
        sdt = self.state_dtype
        dA_arr = self._derivative(dA, "dA", (m,) if t.is_class else (t.indices.size,))
        if t.is_class and t.active is not None:
            dA_arr = np.ascontiguousarray(dA_arr[t.active.astype(bool)])
        dq_arr = self._derivative(dq, "dq", (m,))
        ds_arr = self._derivative(ds, "ds", (m,))
        grad_h = self._core.backward_step(h, t.indptr, t.indices, dA_arr.astype(sdt, copy=False),
                                          dq_arr.astype(sdt, copy=False), ds_arr.astype(sdt, copy=False), lr,
                                          weight_decay)
        return grad_h.astype(out_dtype, copy=False)

    def _derivative(self, x: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
        arr = np.asarray(x)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)) or arr.dtype == np.bool_:
            raise TypeError(f"{name} must be a real array, got dtype {arr.dtype}")
        if arr.shape != shape:
            raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
        return np.ascontiguousarray(arr, dtype=self.state_dtype)

    # ------------------------------------------------------------------ inference
    def weight(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The dense W[start:stop] (default all D rows), shape (stop - start, d), in the weight's dtype."""
        stop = self.num_outputs if stop is None else stop
        return self._core.weight_rows(int(start), int(stop))

    def logits(self, H: np.ndarray, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The outputs o = W h for rows of H, columns [start, stop) (default all D): shape (m, stop - start)."""
        h, _ = self._hidden(H)
        stop = self.num_outputs if stop is None else stop
        return self._core.logits(h, int(start), int(stop))

    def topk(self, H: np.ndarray, k: int, *, by: str = "output", kind: str | None = None,
             eps: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k best outputs of each row over all D, ``(values, indices)`` each (m, k), best first, in tiles.

        ``by="output"`` ranks by the output o and returns the outputs. ``by="probability"`` ranks by the
        probability of the distribution ``kind`` (``"spherical_softmax"``: p ~ o^2 + eps, so by |o|;
        ``"taylor_softmax"``: p ~ 1 + o + o^2/2; default the layer's loss, ``eps`` default the layer's) and returns
        exact log-probabilities. Ranking by the output is not ranking by the probability for these losses.
        """
        h, _ = self._hidden(H)
        if by == "output":
            return self._core.topk(h, int(k))
        if by != "probability":
            raise ValueError(f"by must be 'output' or 'probability', got {by!r}")
        kind, eps = self._distribution(kind, eps)
        outputs, indices = self._core.topk(h, int(k), "square" if kind == "spherical_softmax" else "taylor")
        q, s = self._norms(h)
        return log_prob_of_outputs(kind, outputs.astype(np.float64), q[:, None], s[:, None], self.num_outputs,
                                   eps), indices

    def log_prob(self, H: np.ndarray, targets: Any, kind: str | None = None, *,
                 eps: float | None = None) -> np.ndarray:
        """Exact log-probabilities of the target entries under spherical or Taylor softmax, O(d^2) per example.

        ``kind`` is ``"spherical_softmax"`` or ``"taylor_softmax"``; default the layer's loss (``eps`` default the
        layer's). The normaliser (q + D eps, or D + s + q/2) comes from Q and w_bar, never from the D outputs.
        Shape as A of :meth:`forward`.
        """
        kind, eps = self._distribution(kind, eps)
        A, q, s = self.forward(H, targets)
        rows = self._rows_of_entries(targets, q.shape[0])
        return log_prob_of_outputs(kind, A.astype(np.float64), q[rows].astype(np.float64),
                                   s[rows].astype(np.float64), self.num_outputs, eps)

    def _distribution(self, kind: str | None, eps: float | None) -> tuple[str, float]:
        kind = self._loss if kind is None else kind
        if kind not in ("spherical_softmax", "taylor_softmax"):
            raise ValueError(f"kind must be 'spherical_softmax' or 'taylor_softmax' (the losses that define a "
                             f"normalised distribution), got {kind!r}")
        if eps is None:
            eps = self._loss_options.get("eps", LOSS_OPTIONS["spherical_softmax"]["eps"])
        elif not float(eps) > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        return kind, float(eps)

    def _norms(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """q = ||o||^2 and s = sum(o) for each row of h (state dtype), O(m d^2)."""
        m = h.shape[0]
        _, q, s = self._core.forward(h, np.zeros(m + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))
        return q.astype(np.float64), s.astype(np.float64)

    def _rows_of_entries(self, targets: Any, m: int) -> np.ndarray:
        t = self._targets(targets, m)
        if t.is_class:
            return np.arange(m)
        return np.repeat(np.arange(m), np.diff(t.indptr))

    # ------------------------------------------------------------------ stability and state
    def refresh(self) -> None:
        """Recompute U^-1, Q = W^T W and w_bar = W^T 1 from V, U, omega (O(D d^2); removes accumulated drift)."""
        self._core.refresh()

    def stabilize(self) -> dict[str, Any]:
        """Correct U now: singular values out of band are set to 1 in one pass over V, U^-1 is rebuilt. W is
        unchanged. Returns what was done."""
        return self._core.correct()

    def diagnostics(self) -> dict[str, float]:
        """Health of the factorisation.

        ``condition`` (sigma_max / sigma_min of U), ``sigma_max``, ``sigma_min`` and ``inverse_error``
        (||U U^-1 - I||_F) are exact, O(d^3); ``monitor_sigma_max``, ``monitor_sigma_min`` and
        ``monitor_residual`` are the running O(d^2) estimates that trigger corrections; ``steps``,
        ``corrections``, ``corrected_values`` and ``refreshes`` count what happened.
        """
        return diagnostics_from(self._arrays["stats"], self._arrays["U"], self._core.inverse_error())

    def config(self) -> dict[str, Any]:
        """The layer's settings (loss, its options, ignore_index, stabilisation policy) as a JSON-able dict."""
        core = self._core
        return {
            "loss": self._loss,
            "loss_options": self._loss_options,
            "ignore_index": self.ignore_index,
            "sigma_range": [core.sigma_low, core.sigma_high],
            "inverse_tol": core.inverse_tol,
            "check_every": core.check_every,
            "refresh_every": core.refresh_every,
            "min_rcond": core.min_rcond,
        }

    def state_dict(self) -> dict[str, Any]:
        """A copy of the complete state (arrays and configuration); :meth:`load_state_dict` resumes bit-exactly."""
        sd: dict[str, Any] = {k: v.copy() for k, v in self._arrays.items()}
        sd["config"] = self.config()
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of a layer with the same D, d and dtypes (arrays are copied in place)."""
        missing = [k for k in (*STATE_ARRAYS, "config") if k not in state]
        if missing:
            raise KeyError(f"state is missing {missing}")
        new = {}
        for k in STATE_ARRAYS:
            src = np.asarray(state[k])
            dst = self._arrays[k]
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"state[{k!r}] has shape {src.shape} and dtype {src.dtype}, expected {dst.shape} "
                                 f"and {dst.dtype}")
            new[k] = src
        cfg = state["config"]
        spec, options = loss_spec(cfg["loss"], dict(cfg["loss_options"]))
        for k, src in new.items():
            np.copyto(self._arrays[k], src)
        self._spec, self._loss_options, self._loss = spec, options, cfg["loss"]
        self.ignore_index = int(cfg["ignore_index"])
        self.set_stabilization(sigma_range=tuple(cfg["sigma_range"]), inverse_tol=cfg["inverse_tol"],
                               check_every=cfg["check_every"], refresh_every=cfg["refresh_every"])
        self._core.min_rcond = float(cfg["min_rcond"])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save the complete state to an ``.npz`` file (see :meth:`load`)."""
        sd = self.state_dict()
        config = json.dumps(sd.pop("config"))
        with open(path, "wb") as f:
            np.savez(f, config=np.array(config), **sd)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FactoredOutput:
        """A layer restored from :meth:`save`, resuming bit-exactly."""
        with np.load(path, allow_pickle=False) as data:
            sd: dict[str, Any] = {k: data[k] for k in STATE_ARRAYS}
            sd["config"] = json.loads(str(data["config"]))
        layer = cls.__new__(cls)
        cfg = sd["config"]
        layer._setup(np.array(sd["V"], order="C"), state_dtype=sd["U"].dtype, loss=cfg["loss"],
                     loss_options=dict(cfg["loss_options"]))
        layer.load_state_dict(sd)
        return layer
