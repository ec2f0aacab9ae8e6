"""Type stub of the compiled CUDA backend (csrc/cuda/bindings_cuda.cpp): the FactoredCore of _core
(csrc/bindings_common.h: same methods, argument order and docstrings) over torch CUDA tensors."""

from ._core import _FactoredCoreMethods

__version__: str
CUDA_ARCHITECTURES: str

def device_status() -> tuple[bool, str]: ...
def runtime_version() -> int: ...

class FactoredCore(_FactoredCoreMethods):
    @property
    def workspace_bytes(self) -> int: ...
