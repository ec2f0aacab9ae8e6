"""sparsetarget: exact training of huge output layers with sparse targets in time independent of D."""

# Load OpenBLAS from the scipy-openblas32 wheel before _core: it resolves the library both for an installed
# wheel (where _core's RPATH also points at it) and for an editable build (where it does not).
import scipy_openblas32 as _scipy_openblas32  # noqa: F401

from . import _core
from ._core import SingularUpdateError
from .layer import LOSS_OPTIONS, FactoredOutput

__version__: str = _core.__version__


def build_info() -> dict:
    """How the compiled core was built: ``version``, ``blas``, ``cuda`` (bool), compiler, BLAS threads."""
    return dict(_core.build_info())


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
    "get_num_threads",
    "set_num_threads",
]
