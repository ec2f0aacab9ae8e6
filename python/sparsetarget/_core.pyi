"""Type stub of the compiled CPU backend (csrc/cpu/bindings_cpu.cpp); its FactoredCore binds the same methods as
_cuda.FactoredCore (csrc/bindings_common.h) plus the CPU's own built-in losses and dense views."""

import enum
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str
STATS_SIZE: int

class DomainError(ValueError): ...
class SingularUpdateError(ValueError):
    """An update was refused because its factor would be singular or too ill-conditioned for the state dtype (its
    reciprocal condition below ``min_rcond``), typically from a too-large learning rate. The layer's state is left as
    it was before the call. Lower ``lr``, or use ``state_dtype=float64``."""

def build_info() -> dict[str, Any]: ...
def set_num_threads(n: int, passes: bool = True) -> None: ...
def get_num_threads() -> int: ...
def get_pass_threads() -> int: ...
def default_min_rcond(float64: bool) -> float: ...

DEFAULT_STABILIZATION: dict[str, Any]

class LossSpec:
    @property
    def eps(self) -> float: ...
    @property
    def a(self) -> float: ...
    @property
    def b(self) -> float: ...

def make_loss_spec(name: str, eps: float, a: float, b: float) -> LossSpec: ...

class Stat(enum.IntEnum):
    steps = 0
    corrections = 1
    corrected_values = 2
    refreshes = 3
    sigma_max = 4
    sigma_min = 5
    inverse_residual = 6

_Array = npt.NDArray[Any]
_Projections = tuple[_Array, _Array, _Array, _Array, _Array]

class _FactoredCoreMethods:
    """What _core.FactoredCore and _cuda.FactoredCore bind alike (csrc/bindings_common.h); arrays are NumPy
    arrays for _core and torch CUDA tensors for _cuda."""

    sigma_low: float
    sigma_high: float
    inverse_tol: float
    check_every: int
    refresh_every: int
    min_rcond: float
    stream: int  # ignored on the CPU
    tf32: bool  # ignored on the CPU
    def __init__(self, V: _Array, U: _Array, U_inv: _Array, Q: _Array, omega: _Array, w_bar: _Array,
                 probe_max: _Array, probe_min: _Array, stats: npt.NDArray[np.float64]) -> None: ...
    @property
    def D(self) -> int: ...
    @property
    def d(self) -> int: ...
    def forward(self, H: _Array, indptr: _Array, indices: _Array,
                keep_projections: bool = False) -> tuple[Any, ...]: ...
    def grad_hidden(self, H: _Array, indptr: _Array, indices: _Array, dA: _Array, dq: _Array, ds: _Array,
                    projections: _Projections | None = None) -> _Array: ...
    def backward_step(self, H: _Array, indptr: _Array, indices: _Array, dA: _Array, dq: _Array, ds: _Array, lr: float,
                      weight_decay: float, projections: _Projections | None = None,
                      grad_H: _Array | None = None) -> _Array: ...
    def refresh(self) -> None: ...
    def stabilize(self) -> dict[str, Any]: ...
    def inverse_error(self) -> float: ...
    def synchronize(self) -> None: ...
    def poll(self) -> None: ...

class FactoredCore(_FactoredCoreMethods):
    def loss(self, H: _Array, indptr: _Array, indices: _Array, values: _Array, active: _Array | None,
             spec: LossSpec) -> npt.NDArray[np.float64]: ...
    def step(self, H: _Array, indptr: _Array, indices: _Array, values: _Array, active: _Array | None, spec: LossSpec,
             lr: float, weight_decay: float) -> tuple[npt.NDArray[np.float64], _Array]: ...
    def weight_rows(self, start: int, stop: int) -> _Array: ...
    def logits(self, H: _Array, start: int, stop: int) -> _Array: ...
    def topk(self, H: _Array, k: int, rank: str = ...) -> tuple[_Array, npt.NDArray[np.int64]]: ...
