"""sparsetarget: exact training of huge output layers with sparse targets in time independent of D."""

# Load OpenBLAS from the scipy-openblas32 wheel before _core: it resolves the library both for an installed
# wheel (where _core's RPATH also points at it) and for an editable build (where it does not).
import importlib
from types import ModuleType

import scipy_openblas32 as _scipy_openblas32  # noqa: F401

from . import _core, _threads
from ._core import SingularUpdateError
from .layer import LOSS_OPTIONS, FactoredOutput

__version__: str = _core.__version__


def build_info() -> dict:
    """How the compiled core was built: ``version``, ``blas``, ``cuda`` (the CUDA backend was compiled; whether a
    device can use it is :func:`cuda_status`), compiler, BLAS threads."""
    return dict(_core.build_info())


def _cuda_module() -> ModuleType:
    """The CUDA backend module ``sparsetarget._cuda``, imported on first use (it links cuBLAS, which a CPU-only
    machine may not have). Raises RuntimeError saying why it cannot be used."""
    if not _core.build_info()["cuda"]:
        raise RuntimeError("sparsetarget was not compiled with CUDA: reinstall it from source on a machine with nvcc "
                           "and cuBLAS (the CUDA toolkit, or `pip install nvidia-cublas`); see build_info()")
    try:
        return importlib.import_module("._cuda", __name__)
    except ImportError as err:  # e.g. the cuBLAS library it was built against is gone
        raise RuntimeError(f"sparsetarget's CUDA backend cannot be loaded: {err}") from err


def cuda_status() -> tuple[bool, str]:
    """``(usable, reason)``: whether the CUDA backend can run here (compiled in, loadable, a device of compute
    capability 8.0 or newer visible), and if not, why."""
    try:
        cuda = _cuda_module()
    except RuntimeError as err:
        return False, str(err)
    usable, reason = cuda.device_status()
    return bool(usable), str(reason)


def set_num_threads(n: int) -> None:
    """Set the number of BLAS threads the core uses (OpenBLAS; default: all cores or OPENBLAS_NUM_THREADS, and 1
    once ``sparsetarget.torch`` is imported unless set here or by OPENBLAS_NUM_THREADS: see ``_threads``)."""
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _core.set_num_threads(int(n))
    _threads.mark_chosen()


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
