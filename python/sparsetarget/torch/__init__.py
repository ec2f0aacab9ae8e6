"""PyTorch front end: an exact factored output layer for any torch model (``pip install sparsetarget[torch]``).

- :class:`FactoredLinear`: the output layer as an ``nn.Module``; ``head(h, target)`` returns (A, q, s).
- Losses on those outputs: :func:`squared_error_loss`, :func:`spherical_softmax_loss`,
  :func:`taylor_softmax_loss`, :func:`z_loss`, and :func:`linear_spherical_loss` / :class:`LinearSphericalLoss`.
- :class:`FactoredSGD`: the optimizer that applies the exact updates (plain SGD with weight decay).
"""

from .._engine import threads_for_torch
from ._target import SparseTarget
from .functional import (
    LOSSES,
    HeadOutput,
    linear_spherical_loss,
    spherical_softmax_loss,
    squared_error_loss,
    taylor_softmax_loss,
    z_loss,
)
from .modules import FactoredLinear, LinearSphericalLoss
from .optim import FactoredSGD

threads_for_torch()  # the core's BLAS threads must not compete with torch's (see _engine.threads_for_torch)

__all__ = [
    "LOSSES",
    "FactoredLinear",
    "FactoredSGD",
    "HeadOutput",
    "LinearSphericalLoss",
    "SparseTarget",
    "linear_spherical_loss",
    "spherical_softmax_loss",
    "squared_error_loss",
    "taylor_softmax_loss",
    "z_loss",
]
