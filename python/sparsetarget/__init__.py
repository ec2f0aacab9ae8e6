"""sparsetarget: exact training of huge output layers with sparse targets in time independent of D."""

from __future__ import annotations

import ctypes
import importlib
import os
from types import ModuleType

# Load OpenBLAS from the scipy-openblas32 wheel before _core: it resolves the library both for an installed
# wheel (where _core's RPATH also points at it) and for an editable build (where it does not).
import scipy_openblas32 as _scipy_openblas32  # noqa: F401

from . import _core
from ._core import SingularUpdateError
from .layer import LOSS_OPTIONS, FactoredOutput

__version__: str = _core.__version__

SingularUpdateError.__doc__ = (
    "An update was refused because its factor would be singular or too ill-conditioned for the state dtype (its "
    "reciprocal condition below ``min_rcond``), typically from a too-large learning rate. A ``ValueError``; the "
    "layer's state is left as it was before the call. Lower ``lr``, or use ``state_dtype=float64``.")


def build_info() -> dict:
    """How the compiled core was built: ``version``, ``blas``, ``cuda`` (the CUDA backend was compiled; whether a
    device can use it is :func:`cuda_status`), compiler, BLAS threads."""
    return dict(_core.build_info())


def _cuda_compiled() -> bool:
    return bool(_core.build_info()["cuda"])


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


def _cuda_module() -> ModuleType:
    """The CUDA backend module ``sparsetarget._cuda``, imported on first use (it links cuBLAS, which a CPU-only
    machine may not have). Raises RuntimeError saying why it cannot be used."""
    if not _cuda_compiled():
        raise RuntimeError(_not_compiled_reason())
    try:
        return importlib.import_module("._cuda", __name__)
    except ImportError as err:  # e.g. the cuBLAS library it was built against is gone
        raise RuntimeError(f"sparsetarget's CUDA backend cannot be loaded: {err}. cuBLAS comes from the "
                           "nvidia-cublas wheel (`pip install nvidia-cublas`) or the CUDA toolkit it was built "
                           "with") from err


def cuda_status() -> tuple[bool, str]:
    """``(usable, reason)``: whether the CUDA backend can run here (compiled in, loadable, an NVIDIA driver recent
    enough for its CUDA runtime, a device of compute capability 8.0 or newer visible), and if not, why and what to
    do. In particular it says when a GPU is visible but this build has no CUDA backend."""
    try:
        cuda = _cuda_module()
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


def set_num_threads(n: int) -> None:
    """Set the number of BLAS threads the core uses (OpenBLAS; default: all cores or OPENBLAS_NUM_THREADS)."""
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    """Number of BLAS threads the core uses."""
    return int(_core.get_num_threads())


__all__ = [
    "LOSS_OPTIONS",
    "FactoredOutput",
    "SingularUpdateError",
    "__version__",
    "build_info",
    "cuda_status",
    "get_num_threads",
    "set_num_threads",
]
