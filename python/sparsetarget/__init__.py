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
