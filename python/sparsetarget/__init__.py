"""sparsetarget: exact training of huge output layers with sparse targets in time independent of D."""

from ._engine import (
    SingularUpdateError,
    __version__,
    build_info,
    cuda_status,
    get_num_threads,
    set_num_threads,
)
from .layer import LOSS_OPTIONS, FactoredOutput

SingularUpdateError.__doc__ = (
    "An update was refused because its factor would be singular or too ill-conditioned for the state dtype (its "
    "reciprocal condition below ``min_rcond``), typically from a too-large learning rate. A ``ValueError``; the "
    "layer's state is left as it was before the call. Lower ``lr``, or use ``state_dtype=float64``.")

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
