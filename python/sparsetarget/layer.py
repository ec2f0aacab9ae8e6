"""NumPy API: :class:`FactoredOutput`, an exactly trained D x d output layer kept as W = V U + 1 omega^T."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from typing import Any

import numpy as np

from ._engine import (
    LOSS_OPTIONS,
    STATE_ARRAYS,
    CpuEngine,
    Recorded,
    check_distribution,
    check_int,
    check_lr,
    check_scalar,
    default_min_rcond,
    float_dtype,
    initial_small_state,
    loss_spec,
    stabilization_updates,
)
from ._targets import CSRTargets, to_csr

__all__ = ["LOSS_OPTIONS", "STATE_ARRAYS", "FactoredOutput"]


class FactoredOutput:
    """A D x d linear output layer o = W h trained by exact SGD in O(m d^2 + nnz d) per minibatch.

    The dense W is never stored: the layer keeps W = V U + 1 omega^T with V (D x d) in the weight's dtype and the
    small d x d state (U, U^-1, Q = W^T W, omega, w_bar = W^T 1) in ``state_dtype``. Every method gives the same
    numbers, up to rounding, as the dense layer would.

    dtypes of results: A, q, s, logits, top-k values and log-probabilities are in the state dtype; grad_H is in
    the dtype of H; the built-in losses of :meth:`loss` and :meth:`step` are float64; :meth:`dense_weight` is in
    the weight's dtype. The torch front end (``sparsetarget.torch.FactoredLinear``) follows the same rule.

    Args:
        weight: initial W, a (D, d) float32 or float64 array (copied unless ``copy=False``).
        loss: built-in loss used by :meth:`loss` and :meth:`step`: ``"squared_error"`` (||o - y||^2),
            ``"spherical_softmax"`` (option ``eps``), ``"taylor_softmax"`` or ``"z_loss"`` (options ``a``, ``b``).
        state_dtype: dtype of the d x d state, float32 or float64; default the weight's dtype. float64 drifts
            less; float32 is about twice as fast.
        ignore_index: class label whose rows contribute no loss, no gradient and no update.
        sigma_range: (low, high), default (0.1, 10) with a float32 state, (0.2, 5) with a float64 state: U's
            singular values may spread by high / low around their geometric mean s; beyond that a correction brings
            every value outside s (sqrt(low), sqrt(high)) back to s in one pass over V. Wider: rarer passes, more of
            V's rounding amplified by the spread. A uniform scale of U is free; when s drifts beyond 2^+-24, one
            O(D d) pass resets it to 1.
        inverse_tol: tolerated ||U U^-1 x - x|| / ||x|| on the monitoring vector before U^-1 is rebuilt (default
            1e-3).
        check_every: the longest run of steps without an O(d^2) monitoring check (default 16; a check also runs
            whenever bounds carried from the steps say U may have left the band); must be >= 1: without
            monitoring nothing looks at U, whose condition could then grow until the results lose every digit.
        refresh_every: steps between full O(D d^2) refreshes of U^-1, Q and w_bar; default -1: automatic, after
            about 5 D rows of training (ceil(5 D / m) steps of m rows), which bounds their drift for well under 1 %
            of the run time; 0: never.
        min_rcond: a step whose factor M = (1 - lr wd) I - lr H^T diag(2 dL/dq) H has a reciprocal condition
            number below this is refused (default sqrt of the state dtype's machine epsilon).
        copy: False adopts ``weight`` as V when it is a C-contiguous float32/float64 array (the layer then works in
            place on it) instead of copying it.
        **loss_options: options of ``loss`` (see :data:`LOSS_OPTIONS` for defaults).

    Failures: every method checks its arguments and raises ValueError or TypeError naming the bad one; a step that
    cannot be applied exactly (a singular factor, an overflow) raises before anything is written. Either way the
    layer is left bit-identical.

    Threads: a layer may be shared between threads. Each call that changes or reads the state (steps, the dense
    views, :meth:`state_dict`, :meth:`save`, ...) holds the layer's lock for its whole duration, so concurrent steps
    are applied one after the other (in an order the threads' timing decides) and every read sees the state before
    or after a step, never part of one. Different layers never wait for each other.
    """

    def __init__(
        self,
        weight: np.ndarray,
        *,
        loss: str = "squared_error",
        state_dtype: Any = None,
        ignore_index: int = -100,
        sigma_range: tuple[float, float] | None = None,
        inverse_tol: float | None = None,
        check_every: int | None = None,
        refresh_every: int | None = None,
        min_rcond: float | None = None,
        copy: bool = True,
        **loss_options: float,
    ) -> None:
        w = np.asarray(weight)
        if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
            raise ValueError(f"weight must be a non-empty (D, d) array, got shape {w.shape}")
        dtype = float_dtype(w.dtype, "weight")
        if not np.all(np.isfinite(w)):
            raise ValueError("weight contains NaN or inf")
        V = np.array(w, dtype=dtype, order="C", copy=True) if copy else np.ascontiguousarray(w, dtype=dtype)
        if not V.flags.writeable:
            raise ValueError("weight is read-only: with copy=False the layer trains it in place; pass a writeable "
                             "array or copy=True")
        sdt = V.dtype if state_dtype is None else float_dtype(state_dtype, "state_dtype")
        self._spec, self._loss_options = loss_spec(loss, loss_options)
        self._loss = loss
        self.ignore_index = check_int(ignore_index, "ignore_index")
        policy = dict(sigma_range=sigma_range, inverse_tol=inverse_tol, check_every=check_every,
                      refresh_every=refresh_every, min_rcond=min_rcond)
        self._engine = CpuEngine({"V": V, **initial_small_state(V.shape[1], sdt)}, policy)
        self._engine.refresh()

    @classmethod
    def random(
        cls,
        out_features: int,
        in_features: int,
        *,
        dtype: Any = np.float32,
        seed: int | None = 0,
        scale: float | None = None,
        **kwargs: Any,
    ) -> FactoredOutput:
        """A layer of D = ``out_features`` outputs and d = ``in_features`` inputs with W drawn uniformly from
        [-scale, scale] (default 1/sqrt(d), as torch.nn.Linear), seeded.

        ``kwargs`` are the constructor's keyword arguments (loss, state_dtype, loss options, ...).
        """
        if int(out_features) < 1 or int(in_features) < 1:
            raise ValueError(f"out_features and in_features must be >= 1, got {out_features}, {in_features}")
        dt = float_dtype(dtype, "dtype")
        bound = 1.0 / np.sqrt(in_features) if scale is None else check_scalar(scale, "scale")
        rng = np.random.default_rng(seed)
        V = np.empty((int(out_features), int(in_features)), dtype=dt)
        rows = max(1, (1 << 22) // int(in_features))
        for start in range(0, V.shape[0], rows):  # fill in blocks: no float64 copy of the whole matrix
            block = V[start:start + rows]
            block[...] = rng.uniform(-bound, bound, size=block.shape)
        return cls(V, copy=False, **kwargs)

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
        self._engine.set_stabilization(sigma_range=sigma_range, inverse_tol=inverse_tol, check_every=check_every,
                                       refresh_every=refresh_every, min_rcond=min_rcond)

    @property
    def out_features(self) -> int:
        """D, the number of outputs (rows of W)."""
        return self._engine.out_features

    @property
    def in_features(self) -> int:
        """d, the number of inputs (columns of W)."""
        return self._engine.in_features

    @property
    def dtype(self) -> np.dtype:
        """dtype of V and of :meth:`dense_weight`."""
        return self._engine.arrays["V"].dtype

    @property
    def state_dtype(self) -> np.dtype:
        """dtype of the d x d state, of the computations on it and of their results."""
        return self._engine.state_dtype

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
        return (f"FactoredOutput(out_features={self.out_features}, in_features={self.in_features}, "
                f"dtype={self.dtype}, state_dtype={self.state_dtype}, loss={self._loss!r}{opts})")

    # ------------------------------------------------------------------ input checks
    def _hidden(self, H: Any) -> tuple[np.ndarray, np.dtype]:
        """H in the state dtype, contiguous, and the dtype of its gradient (H's own)."""
        engine = self._engine
        if (type(H) is np.ndarray and H.dtype == engine.state_dtype and H.ndim == 2 and H.flags.c_contiguous
                and H.shape[1] == engine.in_features and H.shape[0] >= 1):
            return H, H.dtype  # already what the core takes (the usual step): no conversion calls
        arr = np.asarray(H)
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"H must be a floating-point array, got dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[1] != self.in_features or arr.shape[0] < 1:
            raise ValueError(f"H has shape {arr.shape}, expected (m, d) with m >= 1 and d = {self.in_features}")
        return np.ascontiguousarray(arr, dtype=self.state_dtype), arr.dtype

    def _targets(self, targets: Any, m: int) -> CSRTargets:
        return to_csr(targets, m, self.out_features, self.ignore_index)

    # ------------------------------------------------------------------ training
    def loss(self, H: np.ndarray, targets: Any) -> np.ndarray:
        """Per-example losses (m,) in float64 of the built-in loss at the current weights; no state change."""
        h, _ = self._hidden(H)
        with self._engine.lock:  # the loss and ignore_index of the arrays' configuration (see load_state_dict)
            return self._engine.loss(h, self._targets(targets, h.shape[0]), self._spec)

    def step(self, H: np.ndarray, targets: Any, lr: float, weight_decay: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """One exact SGD step on the summed built-in loss sum_j L_j, with L2 weight decay (torch.optim.SGD rule).

        W <- (1 - lr * weight_decay) W - lr * dL/dW. Returns ``(losses, grad_H)``: the per-example losses (m,),
        float64, and dL/dH (m, d) in H's dtype, both at the weights before the step. On any error the layer is
        unchanged.
        """
        lr, weight_decay = check_lr(lr, weight_decay)
        h, out_dtype = self._hidden(H)
        with self._engine.lock:  # the loss and ignore_index of the arrays' configuration (see load_state_dict)
            losses, grad_h = self._engine.loss_step(h, self._targets(targets, h.shape[0]), self._spec, lr,
                                                    weight_decay)
        return losses, grad_h.astype(out_dtype, copy=False)

    def forward(self, H: np.ndarray, targets: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The spherical-family quantities ``(A, q, s)`` at the current weights, in O(m d^2 + nnz d).

        A: the outputs at the target entries: (m,) for class labels (0 on ignored rows), (nnz,) in the targets' CSR
        order for sparse targets; q = ||o||^2 (m,); s = sum(o) (m,). All in the state dtype.
        """
        h, _ = self._hidden(H)
        with self._engine.lock:  # ignore_index of the arrays' configuration (see load_state_dict)
            A, q, s, _ = self._engine.forward(h, self._targets(targets, h.shape[0]), keep_projections=False)
        return A, q, s

    def backward_step(self, H: np.ndarray, targets: Any, dA: np.ndarray, dq: np.ndarray, ds: np.ndarray, lr: float,
                      weight_decay: float = 0.0) -> np.ndarray:
        """Exact SGD step for any loss of (A, q, s) whose partial derivatives the caller computed.

        ``dA``, ``dq``, ``ds`` are dL/dA, dL/dq, dL/ds with the shapes :meth:`forward` returns. Rows whose class
        label is ``ignore_index`` take no gradient and no update: their dA, dq and ds are not used (their grad_H
        row is 0). Returns grad_H = dL/dH at the weights before the step, in H's dtype.
        """
        lr, weight_decay = check_lr(lr, weight_decay)
        h, out_dtype = self._hidden(H)
        m = h.shape[0]
        with self._engine.lock:  # ignore_index of the arrays' configuration (see load_state_dict)
            t = self._targets(targets, m)
            dA_arr = self._derivative(dA, "dA", (m,) if t.is_class else (t.indices.size,))
            dq_arr, ds_arr = self._derivative(dq, "dq", (m,)), self._derivative(ds, "ds", (m,))
            if t.active is not None:  # ignored rows: alpha = beta = 0 (docs/algorithm.md §1.3); new arrays
                keep, zero = t.active.view(bool), dq_arr.dtype.type(0)
                dq_arr, ds_arr = np.where(keep, dq_arr, zero), np.where(keep, ds_arr, zero)
            grad_h = self._engine.step([Recorded(h, t, dA_arr, dq_arr, ds_arr, None, None)], lr, weight_decay)
        return grad_h.astype(out_dtype, copy=False)

    def _derivative(self, x: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
        arr = np.asarray(x)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)) or arr.dtype == np.bool_:
            raise TypeError(f"{name} must be a real array, got dtype {arr.dtype}")
        if arr.shape != shape:
            raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
        return np.ascontiguousarray(arr, dtype=self.state_dtype)

    # ------------------------------------------------------------------ inference
    def dense_weight(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The dense W[start:stop] (default all D rows), shape (stop - start, d), in the weight's dtype."""
        return self._engine.dense_weight(start, stop)

    def logits(self, H: np.ndarray, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The outputs o = W h for rows of H, columns [start, stop) (default all D): shape (m, stop - start)."""
        h, _ = self._hidden(H)
        return self._engine.logits(h, start, stop)

    def topk(self, H: np.ndarray, k: int, *, by: str = "output", kind: str | None = None,
             eps: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k best outputs of each row over all D, ``(values, indices)`` each (m, k), best first, in tiles.

        ``by="output"`` ranks by the output o and returns the outputs. ``by="probability"`` ranks by the
        probability of the distribution ``kind`` (``"spherical_softmax"``: p ~ o^2 + eps, so by |o|;
        ``"taylor_softmax"``: p ~ 1 + o + o^2/2; default the layer's loss, ``eps`` default the layer's) and returns
        exact log-probabilities. Ranking by the output is not ranking by the probability for these losses.
        """
        h, _ = self._hidden(H)
        k = check_int(k, "k")
        with self._engine.lock:  # the default eps of the arrays' configuration (see load_state_dict)
            if by == "probability":
                kind, eps = self._distribution(kind, eps)
            return self._engine.topk(h, k, by, kind, eps)

    def log_prob(self, H: np.ndarray, targets: Any, kind: str | None = None, *,
                 eps: float | None = None) -> np.ndarray:
        """Exact log-probabilities of the target entries under spherical or Taylor softmax, O(d^2) per example.

        ``kind`` is ``"spherical_softmax"`` or ``"taylor_softmax"``; default the layer's loss (``eps`` default the
        layer's). The normaliser (q + D eps, or D + s + q/2) comes from Q and w_bar, never from the D outputs.
        Shaped like A of :meth:`forward` (0 on ignored rows), in the state dtype.
        """
        h, _ = self._hidden(H)
        with self._engine.lock:  # loss, eps and ignore_index of the arrays' configuration (see load_state_dict)
            kind, eps = self._distribution(kind, eps)
            return self._engine.log_prob(h, self._targets(targets, h.shape[0]), kind, eps)

    def _distribution(self, kind: str | None, eps: float | None) -> tuple[str, float]:
        """``kind`` and ``eps`` with the layer's defaults (its loss, its eps), checked."""
        if eps is None:
            eps = self._loss_options.get("eps", LOSS_OPTIONS["spherical_softmax"]["eps"])
        return check_distribution(self._loss if kind is None else kind, eps)

    # ------------------------------------------------------------------ stability and state
    def refresh(self) -> None:
        """Recompute U^-1, Q = W^T W and w_bar = W^T 1 from V, U, omega (O(D d^2); removes accumulated drift)."""
        self._engine.refresh()

    def stabilize(self) -> dict[str, Any]:
        """Correct U now: singular values out of band are brought back in one pass over V, U^-1 is rebuilt. W is
        unchanged. Returns what was done."""
        return self._engine.stabilize()

    def diagnostics(self) -> dict[str, float]:
        """Health of the factorisation.

        ``condition`` (sigma_max / sigma_min of U), ``sigma_max``, ``sigma_min`` and ``inverse_error``
        (||U U^-1 - I||_F) are exact, O(d^3); ``monitor_sigma_max``, ``monitor_sigma_min`` and
        ``monitor_residual`` are the running O(d^2) estimates that trigger corrections; ``steps``,
        ``corrections``, ``corrected_values`` and ``refreshes`` count what happened.
        """
        return self._engine.diagnostics()

    def config(self) -> dict[str, Any]:
        """The layer's settings (loss, its options, ignore_index, stabilisation policy) as a JSON-able dict."""
        policy = self._engine.policy()
        policy["sigma_range"] = list(policy["sigma_range"])
        return {"loss": self._loss, "loss_options": dict(self._loss_options), "ignore_index": self.ignore_index,
                **policy}

    def state_dict(self) -> dict[str, Any]:
        """A copy of the complete state (arrays and configuration); :meth:`load_state_dict` resumes bit-exactly.
        Taken while no other thread changes the layer."""
        with self._engine.lock:
            sd: dict[str, Any] = {k: v.copy() for k, v in self._engine.arrays.items()}
            sd["config"] = self.config()
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of a layer with the same D, d and dtypes (arrays are copied in place).

        All or nothing: the configuration, the arrays' shapes, dtypes and finiteness, and the invariants
        U U^-1 = I, Q = W^T W and w_bar = W^T 1 (one O(D d) pass over V, see :func:`check_state`) are checked first;
        on any error the layer is unchanged.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = [k for k in (*STATE_ARRAYS, "config") if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}")
        settings = _checked_config(state["config"], self.state_dtype)
        arrays = self._engine.arrays
        new = {}
        for k in STATE_ARRAYS:
            src = np.asarray(state[k])
            dst = arrays[k]
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"state[{k!r}] has shape {src.shape} and dtype {src.dtype}, expected {dst.shape} "
                                 f"and {dst.dtype}")
            new[k] = src
        check_state(new, settings["policy"]["inverse_tol"])
        with self._engine.lock:
            for k, src in new.items():
                np.copyto(arrays[k], src)
            self._apply_config(settings)

    def _apply_config(self, settings: dict[str, Any]) -> None:
        """Apply a configuration checked by :func:`_checked_config` (cannot fail)."""
        self._spec, self._loss_options, self._loss = settings["spec"], settings["loss_options"], settings["loss"]
        self.ignore_index = settings["ignore_index"]
        self._engine.set_stabilization(**settings["policy"])

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        """Pickling and ``copy.deepcopy``: the layer is rebuilt from its :meth:`state_dict`."""
        return _from_state_dict, (self.state_dict(),)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save the complete state to an ``.npz`` file (see :meth:`load`).

        Atomic: the file is written under a temporary name in the same directory, flushed to disk (fsync) and then
        renamed over ``path``, so a crash or kill during the save leaves any previous file at ``path`` intact.
        Streamed: the arrays are written from the layer's memory in chunks (no copy of V). Other threads' calls on
        the layer wait until the save is done, so the file holds one consistent state.
        """
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                with self._engine.lock:
                    np.savez(f, config=np.array(json.dumps(self.config())), **self._engine.arrays)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.chmod(tmp, os.stat(path).st_mode & 0o7777)
            except FileNotFoundError:
                os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FactoredOutput:
        """A layer restored from :meth:`save`, resuming bit-exactly.

        The file is checked before a layer is built: its format, the configuration, every array's presence, shape,
        dtype and finiteness, and the invariants of the state (:func:`check_state`); a damaged or foreign file
        raises ValueError saying what is wrong. Each array is read once, into the memory the layer then uses.
        """
        name = os.fspath(path)
        with open(name, "rb") as f:  # opened here so that it is closed whatever np.load raises
            try:
                data = np.load(f, allow_pickle=False)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
                raise ValueError(f"{name!r} is not a FactoredOutput file (.npz): {err}") from err
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError(f"{name!r} is not a FactoredOutput file: it holds one array, not an .npz")
            with data:
                missing = [k for k in (*STATE_ARRAYS, "config") if k not in data.files]
                if missing:
                    raise ValueError(f"{name!r} is not a complete FactoredOutput file: missing {missing}")
                try:
                    state: dict[str, Any] = {"config": json.loads(str(data["config"][()]))}
                    for k in STATE_ARRAYS:
                        state[k] = data[k]
                except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
                    raise ValueError(f"{name!r} is damaged: {err}") from err
        try:
            return _from_state_dict(state, copy=False)
        except TypeError as err:  # a wrong dtype or type inside the file: the file is what is wrong
            raise ValueError(f"{name!r} is not a valid FactoredOutput file: {err}") from err


def _from_state_dict(state: dict[str, Any], copy: bool = True) -> FactoredOutput:
    """A new layer holding ``state`` (a :meth:`FactoredOutput.state_dict`), checked as by
    :meth:`FactoredOutput.load_state_dict`; with ``copy=False`` the arrays themselves become the layer's state."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    missing = [k for k in (*STATE_ARRAYS, "config") if k not in state]
    if missing:
        raise ValueError(f"state is missing {missing}")
    V, U = np.asarray(state["V"]), np.asarray(state["U"])
    float_dtype(V.dtype, "V")
    sdt = float_dtype(U.dtype, "U")
    if V.ndim != 2 or V.shape[0] < 1 or V.shape[1] < 1:
        raise ValueError(f"V must be a non-empty (D, d) array, got shape {V.shape}")
    settings = _checked_config(state["config"], sdt)
    d = V.shape[1]
    expected = {name: (arr.shape, arr.dtype) for name, arr in initial_small_state(d, sdt).items()}
    expected["V"] = (V.shape, V.dtype)
    arrays = {}
    for k in STATE_ARRAYS:
        arr = np.asarray(state[k])
        shape, dtype = expected[k]
        if arr.shape != shape or arr.dtype != dtype:
            raise ValueError(f"state[{k!r}] has shape {arr.shape} and dtype {arr.dtype}, expected {shape} and {dtype}")
        arrays[k] = np.array(arr, order="C", copy=True) if copy else np.ascontiguousarray(arr)
        if not arrays[k].flags.writeable:
            arrays[k] = arrays[k].copy()
    check_state(arrays, settings["policy"]["inverse_tol"])
    layer = FactoredOutput.__new__(FactoredOutput)
    layer._engine = CpuEngine(arrays, settings["policy"])
    layer._apply_config(settings)
    return layer


def _checked_config(config: Any, state_dtype: Any) -> dict[str, Any]:
    """A layer configuration (:meth:`FactoredOutput.config`) checked completely, ready for ``_apply_config``;
    raises ValueError or TypeError naming the bad entry."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    keys = ("loss", "loss_options", "ignore_index", "sigma_range", "inverse_tol", "check_every", "refresh_every")
    missing = [k for k in keys if k not in config]
    if missing:
        raise ValueError(f"config is missing {missing}")
    if not isinstance(config["loss"], str):
        raise TypeError(f"config['loss'] must be a str, got {type(config['loss']).__name__}")
    if not isinstance(config["loss_options"], dict):
        raise TypeError(f"config['loss_options'] must be a dict, got {type(config['loss_options']).__name__}")
    for name, value in config["loss_options"].items():
        check_finite_number(value, f"config['loss_options'][{name!r}]")
    spec, options = loss_spec(config["loss"], dict(config["loss_options"]))
    ignore_index = config["ignore_index"]
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"config['ignore_index'] must be an int, got {ignore_index!r}")
    min_rcond = config.get("min_rcond")
    if min_rcond is None or (isinstance(min_rcond, (int, float)) and min_rcond < 0):  # 0.1 stored -1: the default
        min_rcond = default_min_rcond(state_dtype)
    policy = dict(sigma_range=config["sigma_range"], inverse_tol=config["inverse_tol"],
                  check_every=config["check_every"], refresh_every=config["refresh_every"], min_rcond=min_rcond)
    for name in ("sigma_range", "inverse_tol", "check_every", "refresh_every"):
        if policy[name] is None:
            raise ValueError(f"config[{name!r}] must be set, got None")
    try:
        updates = stabilization_updates(**policy)
    except (TypeError, ValueError) as err:
        raise type(err)(f"config: {err}") from err
    policy["sigma_range"] = (updates["sigma_low"], updates["sigma_high"])
    return {"spec": spec, "loss_options": options, "loss": config["loss"], "ignore_index": int(ignore_index),
            "policy": policy}


def check_finite_number(x: Any, name: str) -> float:
    """``x`` as a finite float (not a str or bool); raises TypeError or ValueError naming ``name``."""
    if isinstance(x, (str, bytes, bool)) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {x!r}")
    if not np.isfinite(float(x)):
        raise ValueError(f"{name} must be finite, got {x}")
    return float(x)


_ROWS_PER_TILE = 1 << 16


def check_state(arrays: dict[str, np.ndarray], inverse_tol: float) -> None:
    """Check a layer's state arrays (shapes and dtypes already checked) before they are used; raises ValueError.

    Every array must be finite; U U^-1 must be I to within max(1e-2, 10 inverse_tol) per column (d^3); and, from
    one O(D d) pass over V in row tiles with a fixed random probe x, Q x must be W^T (W x) and w_bar must be W^T 1
    to within a relative 1e-2 (float32 state) or 1e-6 (float64 state): loose enough for the drift a long run can
    accumulate, tight enough to catch arrays from different states or damaged values.
    """
    for name in STATE_ARRAYS:
        if name == "V":
            continue
        if not np.all(np.isfinite(arrays[name])):
            raise ValueError(f"state[{name!r}] contains NaN or inf")
    V, U, U_inv = arrays["V"], arrays["U"].astype(np.float64), arrays["U_inv"].astype(np.float64)
    D, d = V.shape
    residual = np.linalg.norm(U @ U_inv - np.eye(d)) / np.sqrt(d)
    if not residual <= max(1e-2, 10 * inverse_tol):
        raise ValueError(f"state['U_inv'] is not the inverse of state['U']: ||U U^-1 - I||_F / sqrt(d) = "
                         f"{residual:.3g}")
    omega = arrays["omega"].astype(np.float64)
    x = np.random.default_rng(0).standard_normal(d)
    x /= np.linalg.norm(x)
    Ux, omega_x = U @ x, float(omega @ x)
    VtWx, Vt1 = np.zeros(d), np.zeros(d)
    Wx_sq = Wx_sum = 0.0
    for r0 in range(0, D, _ROWS_PER_TILE):
        tile = V[r0:r0 + _ROWS_PER_TILE]
        if not np.all(np.isfinite(tile)):
            raise ValueError("state['V'] contains NaN or inf")
        tile = tile.astype(np.float64, copy=False)
        Wx = tile @ Ux + omega_x
        Wx_sq += float(Wx @ Wx)
        VtWx += tile.T @ Wx
        Vt1 += tile.sum(0)
        Wx_sum += float(Wx.sum())
    WtWx = U.T @ VtWx + omega * Wx_sum
    Wt1 = U.T @ Vt1 + D * omega
    tol = 1e-2 if arrays["U"].dtype == np.float32 else 1e-6
    Q, w_bar = arrays["Q"].astype(np.float64), arrays["w_bar"].astype(np.float64)
    if not np.linalg.norm(Q @ x - WtWx) <= tol * np.linalg.norm(WtWx):
        raise ValueError("state['Q'] is not W^T W for W = V U + 1 omega^T (the arrays do not belong to one state, "
                         "or are damaged)")
    if not np.linalg.norm(w_bar - Wt1) <= tol * (np.linalg.norm(Wt1) + np.sqrt(d * Wx_sq)):
        raise ValueError("state['w_bar'] is not W^T 1 for W = V U + 1 omega^T (the arrays do not belong to one "
                         "state, or are damaged)")
