"""The one door to the compiled backends: both front ends (NumPy and torch) sit on the engines defined here.

This module is the only importer of the C++ core ``_core`` and of the CUDA backend ``_cuda``. It holds what the
two front ends share, each written once:

- the defaults and checks: built-in losses and their options, the stabilisation policy (``min_rcond`` resolved
  here for the state dtype, so the bindings need no defaults of their own), lr and weight decay, tile sizes;
- two engines behind one interface (:class:`Engine`): :class:`CpuEngine`, the C++ core on NumPy arrays (the torch
  front end hands over its CPU tensors as zero-copy NumPy views and gets tensors back), and :class:`CudaEngine`,
  the CUDA backend on torch CUDA tensors (torch is imported only there, so the NumPy API never imports it);
- what every engine does the same way: masking of ignored rows, stacking of several recorded minibatches into one
  step (gradient accumulation), log-probabilities and the log-probability ranking of ``topk``.

Targets reach an engine as CSR arrays with a row mask (:class:`CSRTargets` on the CPU, where ignored rows of class
labels have no entry; :class:`DeviceCSR` on a GPU, where every class row keeps one entry that is masked).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import math
import operator
import os
import threading
from types import ModuleType
from typing import Any, Callable, NamedTuple

import numpy as np

# Load OpenBLAS from the scipy-openblas32 wheel before _core: it resolves the library both for an installed wheel
# (where _core's RPATH also points at it) and for an editable build (where it does not).
import scipy_openblas32 as _scipy_openblas32  # noqa: F401

from . import _core
from ._core import SingularUpdateError as SingularUpdateError  # re-exported by the package
from ._targets import CSRTargets

__version__: str = _core.__version__
Stat = _core.Stat
"""Indices of the monitoring counters in the ``stats`` state array."""

# ---------------------------------------------------------------------------------------------- defaults and checks
LOSS_OPTIONS: dict[str, dict[str, float]] = {
    "squared_error": {},
    "spherical_softmax": {"eps": 1e-2},
    "taylor_softmax": {},
    "z_loss": {"a": 0.1, "b": 10.0},
}
"""The built-in losses and the default value of each of their options."""

DISTRIBUTIONS = ("spherical_softmax", "taylor_softmax")
"""The losses that define a normalised distribution (``log_prob``, ``topk(by="probability")``)."""

STATE_ARRAYS = ("V", "U", "U_inv", "Q", "omega", "w_bar", "probe_max", "probe_min", "stats")
"""Names of the state arrays, in the order the cores take them."""

_POLICY = _core.DEFAULT_STABILIZATION  # the core's own defaults (csrc/stabilize_policy.h)
STABILIZATION_DEFAULTS: dict[str, Any] = {
    "sigma_range": None,  # by state dtype: (0.1, 10) for float32, (0.2, 5) for float64 (default_sigma_range)
    "inverse_tol": _POLICY["inverse_tol"],
    "check_every": _POLICY["check_every"],
    "refresh_every": _POLICY["refresh_every"],
    "min_rcond": None,  # sqrt of the state dtype's machine epsilon (default_min_rcond)
}
"""The default stabilisation policy of both front ends (see ``FactoredOutput``'s docstring for each option)."""

TILE_ROWS = 65536
"""Rows of V per tile in the dense views (dense weight, logits, top-k) computed in Python (the CUDA engine)."""

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_INT64_MAX = 2**63 - 1


def float_dtype(dtype: Any, name: str) -> np.dtype:
    """``dtype`` as a NumPy float32 or float64 dtype; raises TypeError naming ``name`` otherwise."""
    dt = np.dtype(dtype)
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt


def _is_boolean(x: Any) -> bool:
    """True for Python, NumPy and torch booleans (scalars or arrays), which int() and float() would take as 0 or 1."""
    return isinstance(x, (bool, np.bool_)) or str(getattr(x, "dtype", None)) in ("bool", "torch.bool")


def check_scalar(x: Any, name: str) -> float:
    """``x`` as a finite float >= 0; raises TypeError or ValueError naming ``name`` otherwise. Strings and booleans
    are refused (``float("0.1")`` and ``float(True)`` would accept them)."""
    if type(x) is float or type(x) is int:  # the common case (e.g. an optimizer's lr on every step)
        value = float(x)
    else:
        kind = getattr(getattr(x, "dtype", None), "kind", "")
        if isinstance(x, (str, bytes, bytearray)) or kind in ("S", "U", "O") or _is_boolean(x):
            raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
        try:
            value = float(x)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a real number, got {type(x).__name__}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def check_int(x: Any, name: str) -> int:
    """``x`` as an int: Python and NumPy integers and one-element integer tensors (not bool, float or str); raises
    TypeError naming ``name``."""
    if type(x) is int:
        return x
    if _is_boolean(x):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    try:
        return operator.index(x)  # int, NumPy integers, integer tensors of one element
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(x).__name__}") from None


def check_lr(lr: Any, weight_decay: Any) -> tuple[float, float]:
    """Check an SGD step's ``lr`` and ``weight_decay`` (finite, >= 0, lr * weight_decay < 1 so that the decay
    factor 1 - lr * weight_decay stays positive); return them as floats."""
    lr = check_scalar(lr, "lr")
    weight_decay = check_scalar(weight_decay, "weight_decay")
    if lr * weight_decay >= 1:
        raise ValueError(f"lr * weight_decay must be < 1, got {lr * weight_decay}")
    return lr, weight_decay


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


def check_distribution(kind: str, eps: float) -> tuple[str, float]:
    """Check a distribution for ``log_prob`` / ``topk(by="probability")`` and its ``eps``."""
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"kind must be 'spherical_softmax' or 'taylor_softmax' (the losses that define a "
                         f"normalised distribution), got {kind!r}")
    value = check_scalar(eps, "eps")
    if not value > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return kind, value


def default_min_rcond(state_dtype: Any) -> float:
    """The default ``min_rcond`` of a state dtype: sqrt of its machine epsilon (a step may cost at most half of the
    state's digits)."""
    return float(_core.default_min_rcond(np.dtype(state_dtype) == np.float64))


def default_sigma_range(state_dtype: Any) -> tuple[float, float]:
    """The default ``sigma_range`` of a state dtype: (0.1, 10) for float32, (0.2, 5) for float64. A wider band
    means rarer corrections (each a pass over V) but more of V's rounding amplified by U's spread; a float32 state
    already rounds at V's level, a float64 state does not (docs/algorithm.md §8.11)."""
    low, high = _core.default_sigma_range(np.dtype(state_dtype) == np.float64)
    return float(low), float(high)


def stabilization_updates(
    *,
    sigma_range: tuple[float, float] | None = None,
    inverse_tol: float | None = None,
    check_every: int | None = None,
    refresh_every: int | None = None,
    min_rcond: float | None = None,
) -> dict[str, Any]:
    """Check a stabilisation policy and return it as the cores' attributes (``sigma_low``, ``sigma_high``,
    ``inverse_tol``, ``check_every``, ``refresh_every``, ``min_rcond``); None means unchanged."""
    updates: dict[str, Any] = {}
    if sigma_range is not None:
        if isinstance(sigma_range, (str, bytes)) or len(sigma_range) != 2:
            raise ValueError(f"sigma_range must be a pair (low, high), got {sigma_range!r}")
        low, high = (check_scalar(x, "sigma_range") for x in sigma_range)
        if not (0 < low < 1 < high) or not np.isfinite(high):
            raise ValueError(f"sigma_range must satisfy 0 < low < 1 < high, got {sigma_range}")
        updates["sigma_low"], updates["sigma_high"] = low, high
    if inverse_tol is not None:
        if not (check_scalar(inverse_tol, "inverse_tol") > 0):
            raise ValueError(f"inverse_tol must be > 0, got {inverse_tol}")
        updates["inverse_tol"] = float(inverse_tol)
    if check_every is not None:
        check_every = check_int(check_every, "check_every")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}: without monitoring nothing looks at U, "
                             "whose condition then grows unchecked and silently costs every digit of the results; "
                             "use a larger value to monitor less often")
        if check_every > _INT64_MAX:
            raise ValueError(f"check_every must be at most 2**63 - 1 (the core counts steps in int64), got "
                             f"{check_every}")
        updates["check_every"] = check_every
    if refresh_every is not None:
        refresh_every = check_int(refresh_every, "refresh_every")
        if refresh_every < -1:
            raise ValueError(f"refresh_every must be -1 (automatic), 0 (never) or a number of steps, got "
                             f"{refresh_every}")
        if refresh_every > _INT64_MAX:
            raise ValueError(f"refresh_every must be at most 2**63 - 1 (the core counts steps in int64), got "
                             f"{refresh_every}")
        updates["refresh_every"] = refresh_every
    if min_rcond is not None:
        check_scalar(min_rcond, "min_rcond")
        if not (0 <= float(min_rcond) < 1):
            raise ValueError(f"min_rcond must be in [0, 1), got {min_rcond}")
        updates["min_rcond"] = float(min_rcond)
    return updates


def initial_small_state(d: int, state_dtype: Any) -> dict[str, np.ndarray]:
    """The d x d state of W = V (U = U^-1 = I, omega = 0; Q and w_bar are filled by a refresh), the fixed
    monitoring vectors and the counters."""
    sdt = np.dtype(state_dtype)
    rng = np.random.default_rng(12345)  # fixed monitoring vectors: runs are reproducible
    probe_max = rng.standard_normal(d)
    probe_min = rng.standard_normal(d)
    stats = np.zeros(_core.STATS_SIZE)
    stats[int(Stat.sigma_max)] = stats[int(Stat.sigma_min)] = 1.0
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


def diagnostics_from(stats: np.ndarray, U: np.ndarray, inverse_error: float) -> dict[str, float]:
    """The diagnostics dict of a layer from its monitoring scalars, U and ||U U^-1 - I||_F."""
    sv = np.linalg.svd(np.asarray(U, dtype=np.float64), compute_uv=False)
    return {
        "condition": float(sv[0] / sv[-1]) if sv[-1] > 0 else float("inf"),
        "sigma_max": float(sv[0]),
        "sigma_min": float(sv[-1]),
        "inverse_error": float(inverse_error),
        "monitor_sigma_max": float(stats[int(Stat.sigma_max)]),
        "monitor_sigma_min": float(stats[int(Stat.sigma_min)]),
        "monitor_residual": float(stats[int(Stat.inverse_residual)]),
        "steps": int(stats[int(Stat.steps)]),
        "corrections": int(stats[int(Stat.corrections)]),
        "corrected_values": int(stats[int(Stat.corrected_values)]),
        "refreshes": int(stats[int(Stat.refreshes)]),
    }


# ---------------------------------------------------------------------------------------------- build and devices
def build_info() -> dict:
    """How the compiled core was built: ``version``, ``blas``, ``cuda`` (the CUDA backend was compiled; whether a
    device can use it is :func:`cuda_status`), compiler, BLAS threads, and ``small_gemm``: the vector width
    (``"avx512"``, ``"avx2"``) of the core's own loops for products with few rows, chosen when it loaded, or ``"off"``
    (no AVX2 on this CPU, or ``SPARSETARGET_SMALL_GEMM=off`` in the environment); ``blas_kernel``: the kernel family
    OpenBLAS runs (``"Haswell"``, ``"SkylakeX"``, ...; empty for a BLAS that does not say), and ``small_gemm_scope``:
    which products the step gives those loops (all of them up to a size where OpenBLAS's kernel is narrower)."""
    return dict(_core.build_info())


def _cuda_note() -> str:
    """Why the configure step built no CUDA backend (recorded by CMake; "" when it built one or did not say)."""
    try:
        from ._build_config import CUDA_NOTE
    except ImportError:
        return ""
    return str(CUDA_NOTE)


def _libcuda() -> ctypes.CDLL | None:
    """The NVIDIA driver's CUDA library (libcuda.so.1), or None when no NVIDIA driver is installed."""
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def _driver_version() -> int | None:
    """CUDA version the installed NVIDIA driver supports (major * 1000 + minor * 10), None without a driver."""
    lib = _libcuda()
    version = ctypes.c_int(0)
    if lib is None or lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value


def _visible_gpus() -> int:
    """Number of NVIDIA GPUs the driver lists on this machine (/proc/driver/nvidia/gpus; 0 without a driver). Read
    from the file system, not through CUDA: initialising CUDA here would break it in processes forked later."""
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _not_compiled_reason() -> str:
    note = _cuda_note()
    why = f" ({note})" if note else ""
    gpus = _visible_gpus()
    if gpus:
        return (f"{gpus} NVIDIA GPU(s) are visible, but this sparsetarget was compiled without CUDA{why}. Rebuild it "
                "from source with nvcc (the CUDA toolkit) on PATH: `pip install -v --force-reinstall .` in the source "
                "tree (`-v` shows the configure step's CUDA line); see the README's CUDA section")
    return (f"sparsetarget was compiled without CUDA{why}: reinstall it from source on a machine with nvcc (cuBLAS "
            "comes from the toolkit or the nvidia-cublas wheel); see build_info() and the README's CUDA section")


def _cuda_compiled() -> bool:
    return bool(_core.build_info()["cuda"])


def cuda_module() -> ModuleType:
    """The CUDA backend module ``sparsetarget._cuda``, imported on first use (it links cuBLAS, which a CPU-only
    machine may not have). Raises RuntimeError saying why it cannot be used."""
    if not _cuda_compiled():
        raise RuntimeError(_not_compiled_reason())
    try:
        return importlib.import_module("._cuda", __package__)
    except ImportError as err:  # e.g. the cuBLAS library it was built against is gone
        raise RuntimeError(f"sparsetarget's CUDA backend cannot be loaded: {err}. cuBLAS comes from the "
                           "nvidia-cublas wheel (`pip install nvidia-cublas`) or the CUDA toolkit it was built "
                           "with") from err


def cuda_status() -> tuple[bool, str]:
    """``(usable, reason)``: whether the CUDA backend can run here (compiled in, loadable, an NVIDIA driver recent
    enough for its CUDA runtime, a device of compute capability 8.0 or newer visible), and if not, why and what to
    do. In particular it says when a GPU is visible but this build has no CUDA backend."""
    try:
        cuda = cuda_module()
    except RuntimeError as err:
        return False, str(err)
    usable, reason = cuda.device_status()
    if usable:
        return True, str(reason)
    driver = _driver_version()
    runtime = int(cuda.runtime_version())
    if driver is None:
        return False, ("no NVIDIA driver is installed (libcuda.so.1 cannot be loaded), so no GPU can be used; the CUDA "
                       "backend needs an NVIDIA GPU of compute capability 8.0 or newer and its driver")
    if driver < runtime:
        return False, (f"the NVIDIA driver supports CUDA {_cuda_version(driver)}, older than the CUDA "
                       f"{_cuda_version(runtime)} runtime this build uses: update the NVIDIA driver (or build "
                       f"sparsetarget with a CUDA toolkit no newer than {_cuda_version(driver)})")
    return False, str(reason)


# Whether the user chose the BLAS thread count (set_num_threads, or OPENBLAS_NUM_THREADS in the environment).
_threads_chosen = "OPENBLAS_NUM_THREADS" in os.environ


def set_num_threads(n: int) -> None:
    """Set the number of threads the core splits its products over, for steps and for the long passes over V
    (refresh, correction, logits, top-k). The threads are the core's own (after a part they poll for the next
    one for 50 microseconds, yielding the core, then block; each part is a single-threaded OpenBLAS call).
    Default: OPENBLAS_NUM_THREADS, else every core; once ``sparsetarget.torch`` is
    imported, steps use 1 unless chosen here or by OPENBLAS_NUM_THREADS (see :func:`threads_for_torch`). A count
    chosen here is kept for every call. LAPACK calls (the d x d inverse of steps with m >= d, the SVD of a
    correction) run on one thread. Built against a BLAS other than OpenBLAS, the core cannot set that library's
    threads, and each part may use them too."""
    global _threads_chosen
    n = check_int(n, "n")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _core.set_num_threads(int(n))
    _threads_chosen = True


def threads_for_torch() -> int:
    """One thread for the core's steps next to torch, unless the count was chosen; returns the count in force.

    A factored step is a few BLAS calls interleaved with torch operations, whose intra-op threads keep spinning for a
    while after each of them: threads of the core's own would compete with them for the cores. (With OpenBLAS's
    spinning threads it was far worse: on a 2-core machine one factored spherical-softmax step at (D, d, m) =
    (100000, 128, 128) took 385 ms with 2 torch threads and 2 OpenBLAS threads instead of 1.9 ms with 1,
    ``benchmarks/bench_lm_step.py``.) The long passes over V (refresh, correction, logits, top-k) keep every core."""
    if not _threads_chosen:
        _core.set_num_threads(1, passes=False)
    return int(_core.get_num_threads())


def get_num_threads() -> int:
    """Number of threads the core splits a step's products over."""
    return int(_core.get_num_threads())


def check_device(device: Any, what: str) -> None:
    """Raise unless an engine can work on torch tensors on ``device``, saying what is missing."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type == "cuda":
        usable, reason = cuda_status()
        if not usable:
            raise RuntimeError(f"{what} cannot live on {device}: {reason}")
        return
    raise RuntimeError(f"{what} is on {device}; sparsetarget supports CPU and CUDA tensors")


def engine_for(tensors: dict[str, Any], policy: dict[str, Any]) -> Engine:
    """The engine working in place on torch state tensors (named as ``STATE_ARRAYS``, all on one device), with the
    stabilisation options ``policy`` (those left out take :data:`STABILIZATION_DEFAULTS`)."""
    device = tensors["V"].device
    check_device(device, "FactoredLinear's state")
    if device.type == "cuda":
        return CudaEngine(tensors, policy)
    views = {}
    for name in STATE_ARRAYS:
        if not tensors[name].is_contiguous():
            raise ValueError(f"internal error: the state tensor {name} must be contiguous")
        views[name] = tensors[name].detach().numpy()  # the same memory: the core updates the tensors in place
    return CpuEngine(views, policy, tensors=True)


# ---------------------------------------------------------------------------------------------- shared engine logic
class DeviceCSR(NamedTuple):
    """Targets of a minibatch on a GPU (int64 tensors): row j holds entries indptr[j] .. indptr[j+1]-1. Class
    labels keep one entry per row; ``active`` (bool per row) masks the ignored ones (their index is a placeholder)."""

    indptr: Any
    indices: Any
    active: Any  # bool tensor (m,) for class labels; None for multi-label targets
    is_class: bool


class Recorded(NamedTuple):
    """What one backward pass contributes to the next step (arrays of the engine's kind)."""

    H: Any  # (m, d) hidden rows in the state dtype
    targets: Any  # CSRTargets or DeviceCSR
    dA: Any  # dL/dA, one per row for class labels (ignored rows: not used), one per entry otherwise
    dq: Any  # (m,)
    ds: Any  # (m,)
    projections: Any  # the engine's projections of H at the forward's weights, or None
    grad_H: Any  # dL/dH (m, d) when known (reused by the step), or None


def class_csr(labels: np.ndarray, out_features: int, ignore_index: int, name: str) -> CSRTargets:
    """Class labels (int64, contiguous, (m,)) as CSR targets, checked and converted by the core: a label outside
    [0, out_features) that is not ``ignore_index`` raises a ValueError naming ``name``. The arrays are new (later
    changes of ``labels`` do not reach them)."""
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64 like the labels, got {ignore_index}")
    return CSRTargets(*_core.class_targets(labels, out_features, ignore_index, name), True)


def rows_from_entries(A: Any, targets: Any) -> Any:
    """A per row for class labels, 0 on ignored rows (the one rule of every engine); multi-label A unchanged."""
    active = targets.active
    if not targets.is_class or active is None:
        return A
    if isinstance(A, np.ndarray):  # CPU: ignored rows have no entry
        full = np.zeros(active.shape[0], dtype=A.dtype)
        full[active.view(bool)] = A
        return full
    return A.where(active, A.new_zeros(()))  # GPU: ignored rows carry a placeholder entry


def entries_from_rows(dA: Any, targets: Any) -> Any:
    """dL/dA per entry of the engine's targets: ignored rows of class labels contribute nothing."""
    active = targets.active
    if not targets.is_class or active is None:
        return dA
    if isinstance(dA, np.ndarray):
        return np.ascontiguousarray(dA[active.view(bool)])
    return dA.where(active, dA.new_zeros(()))


def entry_rows(targets: Any) -> np.ndarray | None:
    """The row of each entry of A (NumPy targets), or None when entry j belongs to row j (class labels)."""
    if targets.is_class:
        return None
    return np.repeat(np.arange(targets.indptr.shape[0] - 1), np.diff(targets.indptr))


def log_prob_of_outputs(kind: str, O: Any, q: Any, s: Any, out_features: int, eps: float) -> Any:
    """log p of outputs O under spherical (``eps``) or Taylor softmax, given the rows' q = ||o||^2 and s = sum(o)
    broadcast like O (NumPy arrays or torch tensors; computed in their dtype, differentiable for tensors)."""
    xp: Any = np if isinstance(O, np.ndarray) else _torch()
    D = float(out_features)
    if kind == "spherical_softmax":
        return xp.log(O * O + eps) - xp.log(q + D * eps)
    return xp.log1p(O + 0.5 * O * O) - xp.log(D + s + 0.5 * q)


def log_prob_of_entries(kind: str, A: Any, q: Any, s: Any, rows: Any, valid: Any, out_features: int,
                        eps: float) -> Any:
    """log p of the target entries A (one per row for class labels, ``rows`` = None; else the row of each entry),
    0 on the rows that ``valid`` (bool per row, or None) marks as ignored."""
    if rows is not None:
        q, s = q[rows], s[rows]
    lp = log_prob_of_outputs(kind, A, q, s, out_features, eps)
    if rows is not None or valid is None:
        return lp
    if isinstance(lp, np.ndarray):
        return np.where(valid, lp, lp.dtype.type(0))
    return lp.where(valid, lp.new_zeros(()))


def _torch() -> Any:
    import torch  # only reached with torch tensors, so the NumPy API never imports torch itself

    return torch


def _stack(records: list[Recorded], cat: Callable[[list[Any]], Any]) -> Recorded:
    """Several recorded minibatches as one (gradient accumulation: one exact step on their summed gradient), with
    dL/dA per entry of the stacked targets."""
    if len(records) == 1:
        r = records[0]
        return r._replace(dA=entries_from_rows(r.dA, r.targets))
    parts, offset = [records[0].targets.indptr[:1]], 0
    for r in records:
        parts.append(r.targets.indptr[1:] + offset)
        offset += r.targets.indices.shape[0]
    # a step needs only indptr and indices: dA below is already per entry
    targets = CSRTargets(cat(parts), cat([r.targets.indices for r in records]), None, None, False)
    projections = None
    if all(r.projections is not None for r in records):
        projections = tuple(cat([r.projections[i] for r in records]) for i in range(len(records[0].projections)))
    grad_H = cat([r.grad_H for r in records]) if all(r.grad_H is not None for r in records) else None
    return Recorded(cat([r.H for r in records]), targets, cat([entries_from_rows(r.dA, r.targets) for r in records]),
                    cat([r.dq for r in records]), cat([r.ds for r in records]), projections, grad_H)


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` run while holding the engine's lock (see :class:`Engine`)."""

    @functools.wraps(method)
    def run_locked(self: Engine, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return run_locked


class Engine:
    """What both front ends ask of a backend. Arrays are of the engine's kind (NumPy arrays, or torch tensors on
    the engine's device); H is (m, d) in the state dtype, contiguous.

    Results (A, q, s, logits, top-k values, log-probabilities) are in the state dtype; dense weights in V's dtype.

    Threads: every engine holds a re-entrant lock, ``lock``, for the whole of each call that changes or reads its
    state (the compiled cores release the GIL while they work, so without it two threads stepping one layer would
    interleave their in-place writes). Calls on one layer from several threads are therefore serialised: each sees
    the state before or after another thread's step, never a part of one. A front end that reads the state arrays
    itself (checkpoints) holds ``lock`` while it does.
    """

    lock: threading.RLock
    fuses_losses = False  # True: forward_loss evaluates the built-in losses in the core
    out_features: int  # D
    in_features: int  # d, the width of H (including a bias column if the front end adds one)
    core: Any  # the compiled core
    _numpy_state_dtype: np.dtype

    def _set_initial_policy(self, policy: dict[str, Any] | None) -> None:
        """The stabilisation options given (None or left out: :data:`STABILIZATION_DEFAULTS`), every one set in the
        core explicitly, ``sigma_range`` and ``min_rcond`` resolved for the state dtype."""
        options = {**STABILIZATION_DEFAULTS, **{k: v for k, v in (policy or {}).items() if v is not None}}
        if options["sigma_range"] is None:
            options["sigma_range"] = default_sigma_range(self._numpy_state_dtype)
        if options["min_rcond"] is None:
            options["min_rcond"] = default_min_rcond(self._numpy_state_dtype)
        self.set_stabilization(**options)

    @_locked
    def set_stabilization(self, **options: Any) -> None:
        """Check and apply stabilisation options (see :func:`stabilization_updates`; None: unchanged), all checked
        before any is applied."""
        for name, value in stabilization_updates(**options).items():
            setattr(self.core, name, value)

    @_locked
    def policy(self) -> dict[str, Any]:
        """The stabilisation policy in force, ``sigma_range`` and ``min_rcond`` resolved."""
        core = self.core
        return {"sigma_range": (core.sigma_low, core.sigma_high), "inverse_tol": core.inverse_tol,
                "check_every": core.check_every, "refresh_every": core.refresh_every, "min_rcond": core.min_rcond}

    # primitives of each backend
    @_locked
    def forward(self, H: Any, targets: Any, keep_projections: bool = True) -> tuple[Any, Any, Any, Any]:
        """``(A, q, s, projections)``: A per row for class labels (0 on ignored rows), per entry otherwise."""
        raise NotImplementedError

    @_locked
    def grad_hidden(self, H: Any, targets: Any, dA: Any, dq: Any, ds: Any, projections: Any) -> Any:
        """dL/dH (m, d) from dL/dA (shaped like A of :meth:`forward`), dL/dq, dL/ds; no state change."""
        raise NotImplementedError

    def _backward_step(self, r: Recorded, lr: float, weight_decay: float) -> Any:
        raise NotImplementedError

    def _cat(self, parts: list[Any]) -> Any:
        raise NotImplementedError

    @_locked
    def norms(self, H: Any) -> tuple[Any, Any]:
        """q = ||o||^2 and s = sum(o) per row of H, O(m d^2)."""
        raise NotImplementedError

    def _topk(self, H: Any, k: int, rank: str) -> tuple[Any, Any]:
        raise NotImplementedError

    # written once for every backend
    @_locked
    def step(self, records: list[Recorded], lr: float, weight_decay: float) -> Any:
        """One exact SGD step on the summed gradient of the recorded minibatches (``lr`` and ``weight_decay``
        checked by :func:`check_lr`). Returns dL/dH of the stacked minibatch. On error the state is unchanged."""
        return self._backward_step(_stack(records, self._cat), lr, weight_decay)

    @_locked
    def topk(self, H: Any, k: int, by: str = "output", kind: str | None = None,
             eps: float | None = None) -> tuple[Any, Any]:
        """The k best outputs per row, ``(values, indices)`` (m, k), best first: by the output (values: outputs),
        or by the probability of ``kind`` with ``eps`` (values: exact log-probabilities)."""
        if by == "output":
            return self._topk(H, k, "output")
        if by != "probability":
            raise ValueError(f"by must be 'output' or 'probability', got {by!r}")
        kind, eps = check_distribution(kind, eps)  # type: ignore[arg-type]
        outputs, indices = self._topk(H, k, "square" if kind == "spherical_softmax" else "taylor")
        q, s = self.norms(H)
        return log_prob_of_outputs(kind, outputs, q[:, None], s[:, None], self.out_features, eps), indices


class CpuEngine(Engine):
    """The C++ core working in place on NumPy state arrays (named as ``STATE_ARRAYS``).

    With ``tensors=True`` the arrays are views of torch CPU tensors: arguments may be CPU tensors (handed to the
    core as zero-copy NumPy views) and array results come back as tensors sharing the core's output memory.
    """

    fuses_losses = True

    def __init__(self, arrays: dict[str, np.ndarray], policy: dict[str, Any] | None = None, *,
                 tensors: bool = False) -> None:
        self.lock = threading.RLock()
        self.arrays = {name: arrays[name] for name in STATE_ARRAYS}
        self.core = _core.FactoredCore(*self.arrays.values())
        self.out_features, self.in_features = self.arrays["V"].shape
        self.state_dtype = self.arrays["U"].dtype
        self._numpy_state_dtype = self.state_dtype
        self._from_numpy: Callable[[np.ndarray], Any] = _torch().from_numpy if tensors else _identity
        self._set_initial_policy(policy)

    # training
    @_locked
    def forward(self, H: Any, targets: CSRTargets, keep_projections: bool = True) -> tuple[Any, Any, Any, Any]:
        out = self.core.forward(_np(H), targets.indptr, targets.indices, keep_projections)
        A = rows_from_entries(out[0], targets)
        wrap = self._from_numpy
        return wrap(A), wrap(out[1]), wrap(out[2]), (out[3] if keep_projections else None)

    def forward_loss(self, H: Any, targets: CSRTargets, spec: Any, with_grad: bool,
                     copy_hidden: bool = False) -> tuple[Any, ...]:
        """A built-in loss (``spec`` from :func:`loss_spec`) in one pass: ``(losses, dA, dq, ds, projections,
        grad_H, total, H_copy)``, the per-example losses (float64), their partials dL/dA (per target entry), dL/dq,
        dL/ds, the projections of H for :meth:`grad_hidden` and the step, with ``with_grad`` dL/dH (else None), the
        sum of the losses (a float) and with ``copy_hidden`` a copy of H (else None). NumPy arrays. No state
        change."""
        with self.lock:  # held inline: this runs on every training step
            return self.core.loss_gradient(_np(H), targets.indptr, targets.indices, targets.values, targets.active,
                                           spec, with_grad, copy_hidden)

    @_locked
    def grad_hidden(self, H: Any, targets: CSRTargets, dA: Any, dq: Any, ds: Any, projections: Any) -> Any:
        grad_H = self.core.grad_hidden(_np(H), targets.indptr, targets.indices, entries_from_rows(_np(dA), targets),
                                       _np(dq), _np(ds), projections)
        return self._from_numpy(grad_H)

    def step(self, records: list[Recorded], lr: float, weight_decay: float) -> Any:  # Engine.step holds the lock
        native = [Recorded(_np(r.H), r.targets, _np(r.dA), _np(r.dq), _np(r.ds), r.projections,
                           None if r.grad_H is None else _np(r.grad_H)) for r in records]
        return self._from_numpy(super().step(native, lr, weight_decay))

    def _backward_step(self, r: Recorded, lr: float, weight_decay: float) -> np.ndarray:
        return self.core.backward_step(r.H, r.targets.indptr, r.targets.indices, r.dA, r.dq, r.ds, lr, weight_decay,
                                       r.projections, r.grad_H)

    def _cat(self, parts: list[Any]) -> np.ndarray:
        return np.concatenate(parts)

    @_locked
    def log_prob(self, H: np.ndarray, targets: CSRTargets, kind: str, eps: float) -> np.ndarray:
        """Exact log-probabilities of the target entries (shaped like A of :meth:`forward`, 0 on ignored rows)."""
        A, q, s, _ = self.forward(H, targets, keep_projections=False)
        valid = None if targets.active is None else targets.active.view(bool)
        return log_prob_of_entries(kind, A, q, s, entry_rows(targets), valid, self.out_features, eps)

    @_locked
    def loss(self, H: np.ndarray, targets: CSRTargets, spec: Any) -> np.ndarray:
        """Per-example losses (float64) of a built-in loss (``spec`` from :func:`loss_spec`); no state change."""
        return self.core.loss(H, targets.indptr, targets.indices, targets.values, targets.active, spec)

    def loss_step(self, H: np.ndarray, targets: CSRTargets, spec: Any, lr: float,
                  weight_decay: float) -> tuple[np.ndarray, np.ndarray]:
        """One exact SGD step on a built-in loss: ``(losses, grad_H)`` at the weights before the step."""
        with self.lock:  # held inline: this runs on every training step
            return self.core.step(H, targets.indptr, targets.indices, targets.values, targets.active, spec, lr,
                                  weight_decay)

    # maintenance
    @_locked
    def refresh(self) -> None:
        """Recompute U^-1, Q and w_bar from V, U, omega (O(D d^2))."""
        self.core.refresh()

    @_locked
    def stabilize(self) -> dict[str, Any]:
        """Correct U now (W unchanged); returns what was done."""
        return dict(self.core.stabilize())

    @_locked
    def diagnostics(self) -> dict[str, float]:
        """See ``FactoredOutput.diagnostics``."""
        return diagnostics_from(self.arrays["stats"], self.arrays["U"], self.core.inverse_error())

    @_locked
    def synchronize(self) -> None:
        """Nothing is asynchronous on the CPU."""

    # dense views (tiled in the core)
    @_locked
    def dense_weight(self, start: int = 0, stop: int | None = None) -> Any:
        """W[start:stop] (default all D rows) in V's dtype."""
        stop = self.out_features if stop is None else stop
        return self._from_numpy(self.core.weight_rows(int(start), int(stop)))

    @_locked
    def logits(self, H: Any, start: int = 0, stop: int | None = None) -> Any:
        """The outputs o = W h for columns [start, stop) (default all D): (m, stop - start)."""
        stop = self.out_features if stop is None else stop
        return self._from_numpy(self.core.logits(_np(H), int(start), int(stop)))

    @_locked
    def norms(self, H: Any) -> tuple[Any, Any]:
        m = H.shape[0]
        _, q, s = self.core.forward(_np(H), np.zeros(m + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))
        return self._from_numpy(q), self._from_numpy(s)

    def _topk(self, H: Any, k: int, rank: str) -> tuple[Any, Any]:
        values, indices = self.core.topk(_np(H), int(k), rank)
        return self._from_numpy(values), self._from_numpy(indices)


def _identity(x: Any) -> Any:
    return x


def _np(x: Any) -> Any:
    """A NumPy array as is; a torch CPU tensor as a NumPy view of its memory (no copy)."""
    return x if isinstance(x, np.ndarray) else x.detach().numpy()


class CudaEngine(Engine):
    """The CUDA backend working in place on torch CUDA state tensors (all on one device).

    ``_cuda.FactoredCore`` binds the methods of ``_core.FactoredCore`` over torch CUDA tensors (it checks their
    dtype, device, shape and contiguity); its outputs are allocated by torch (its caching allocator) and all its
    work is queued on ``torch.cuda.current_stream()``, set as the core's ``stream`` before each call. A training
    step never waits for the device, so it can be captured in a CUDA graph once one step has run (the backend's
    scratch then exists).

    Errors that only the device can see are reported by the next call once the failing work has run: a singular
    update factor, NaN or inf in a step, or a class index outside [0, D) in targets on the GPU. The failing step and
    any step queued after it change nothing; :meth:`synchronize` waits and reports at once. Corrections asked for
    by the monitoring run after the following step (they keep W). The dense views use torch's matmul on row tiles
    of V (:data:`TILE_ROWS`). TF32 follows ``torch.backends.cuda.matmul.allow_tf32``.
    """

    def __init__(self, tensors: dict[str, Any], policy: dict[str, Any] | None = None) -> None:
        self.lock = threading.RLock()
        torch = _torch()
        cuda = cuda_module()
        self.tensors = {name: tensors[name] for name in STATE_ARRAYS}
        V, U = self.tensors["V"], self.tensors["U"]
        self.device = V.device
        for name, t in self.tensors.items():
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, expected {self.device} like V")
        self.out_features, self.in_features = V.shape
        self.state_dtype = U.dtype
        with torch.cuda.device(self.device):
            self.core = cuda.FactoredCore(*(self.tensors[name] for name in STATE_ARRAYS))
        self._numpy_state_dtype = np.dtype(np.float64 if U.dtype == torch.float64 else np.float32)
        self._torch = torch
        self._set_initial_policy(policy)

    def _on_stream(self) -> Any:
        """The core, set to queue its work on torch's current stream."""
        self.core.stream = self._torch.cuda.current_stream(self.device).cuda_stream
        return self.core

    # training
    @_locked
    def forward(self, H: Any, targets: DeviceCSR, keep_projections: bool = True) -> tuple[Any, Any, Any, Any]:
        A, q, s, projections = self._on_stream().forward(H, targets.indptr, targets.indices, True)
        return rows_from_entries(A, targets), q, s, projections

    @_locked
    def grad_hidden(self, H: Any, targets: DeviceCSR, dA: Any, dq: Any, ds: Any, projections: Any) -> Any:
        dA = entries_from_rows(dA, targets)
        return self._on_stream().grad_hidden(H, targets.indptr, targets.indices, dA, dq, ds, projections)

    def _backward_step(self, r: Recorded, lr: float, weight_decay: float) -> Any:
        core = self._on_stream()  # without projections (updates kept across a refresh), the core computes them
        core.tf32 = bool(self._torch.backends.cuda.matmul.allow_tf32)
        return core.backward_step(r.H, r.targets.indptr, r.targets.indices, r.dA, r.dq, r.ds, float(lr),
                                  float(weight_decay), r.projections, r.grad_H)

    def _cat(self, parts: list[Any]) -> Any:
        return self._torch.cat(parts)

    # maintenance (these synchronise)
    @_locked
    def synchronize(self) -> None:
        """Wait for the queued work and raise the error of a failed step."""
        self._on_stream().synchronize()

    @_locked
    def poll(self) -> None:
        """Raise the error of an earlier step if the device has reported one (never waits)."""
        self._on_stream().poll()

    @_locked
    def refresh(self) -> None:
        """As :meth:`CpuEngine.refresh`."""
        self._on_stream().refresh()

    @_locked
    def stabilize(self) -> dict[str, Any]:
        """As :meth:`CpuEngine.stabilize`."""
        return dict(self._on_stream().stabilize())

    @_locked
    def diagnostics(self) -> dict[str, float]:
        """As :meth:`CpuEngine.diagnostics`."""
        self.synchronize()
        error = self._on_stream().inverse_error()
        return diagnostics_from(self.tensors["stats"].cpu().numpy(), self.tensors["U"].double().cpu().numpy(), error)

    # dense views, in row tiles of V
    @_locked
    def dense_weight(self, start: int = 0, stop: int | None = None) -> Any:
        """As :meth:`CpuEngine.dense_weight`."""
        self.poll()
        V, U, omega = self.tensors["V"], self.tensors["U"], self.tensors["omega"]
        start, stop = _row_range(start, stop, self.out_features)
        out = V.new_empty(stop - start, V.shape[1])
        for r0 in range(start, stop, TILE_ROWS):
            r1 = min(r0 + TILE_ROWS, stop)
            out[r0 - start:r1 - start] = self._torch.addmm(omega.unsqueeze(0), V[r0:r1].to(U.dtype), U)
        return out

    def _logit_tiles(self, H: Any, start: int, stop: int | None):  # type: ignore[no-untyped-def]
        self.poll()
        V, U, omega = self.tensors["V"], self.tensors["U"], self.tensors["omega"]
        start, stop = _row_range(start, stop, self.out_features)
        UH = H @ U.T
        Hw = (H @ omega).unsqueeze(1)
        for r0 in range(start, stop, TILE_ROWS):
            yield r0, self._torch.addmm(Hw, UH, V[r0:min(r0 + TILE_ROWS, stop)].to(H.dtype).T)

    @_locked
    def logits(self, H: Any, start: int = 0, stop: int | None = None) -> Any:
        """As :meth:`CpuEngine.logits`."""
        return self._torch.cat([tile for _, tile in self._logit_tiles(H, start, stop)], dim=1)

    @_locked
    def norms(self, H: Any) -> tuple[Any, Any]:
        return ((H @ self.tensors["Q"]) * H).sum(1), H @ self.tensors["w_bar"]

    def _topk(self, H: Any, k: int, rank: str) -> tuple[Any, Any]:
        torch = self._torch
        D = self.out_features
        if not 1 <= k <= D:
            raise ValueError(f"k must be in [1, D={D}], got {k}")
        score = {"output": lambda o: o, "square": lambda o: o * o, "taylor": lambda o: 1 + o + o * o / 2}[rank]
        best_scores = best_values = best_indices = None
        for r0, tile in self._logit_tiles(H, 0, None):
            scores, indices = torch.topk(score(tile), min(k, tile.shape[1]), dim=1)
            values = torch.gather(tile, 1, indices)
            indices = indices + r0
            if best_values is not None:
                scores = torch.cat([best_scores, scores], dim=1)
                values = torch.cat([best_values, values], dim=1)
                indices = torch.cat([best_indices, indices], dim=1)
                scores, order = torch.topk(scores, k, dim=1)
                values = torch.gather(values, 1, order)
                indices = torch.gather(indices, 1, order)
            best_scores, best_values, best_indices = scores, values, indices
        return best_values, best_indices


def _row_range(start: int, stop: int | None, D: int) -> tuple[int, int]:
    start, stop = int(start), D if stop is None else int(stop)
    if not 0 <= start <= stop <= D:
        raise ValueError(f"row range [{start}, {stop}) is not within [0, D={D}]")
    return start, stop

