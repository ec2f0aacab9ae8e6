"""The one place where torch tensors meet the compiled backends: device checks and dispatch.

:func:`engine_for` gives the engine that works in place on a head's state tensors:

- CPU: the C++ core (``_core``) on NumPy views of the tensors' memory (no copies);
- CUDA: the CUDA backend (``_cuda``) on the tensors' device memory, queued on torch's current stream
  (see ``_cuda_engine``).

Both take and return torch tensors, so the autograd Function, the module and the optimizer never ask which runs.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from .. import cuda_status
from ..layer import STATE_ARRAYS, FactoredOutput, diagnostics_from
from ._target import SparseTarget

FLOAT_DTYPES = (torch.float32, torch.float64)
ForwardResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]  # (A, q, s, projections)


def check_device(device: torch.device | str, what: str) -> None:
    """Raise unless a backend can work on tensors on ``device``, saying what is missing."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type == "cuda":
        usable, reason = cuda_status()
        if not usable:
            raise RuntimeError(f"{what} cannot live on {device}: {reason}")
        return
    raise RuntimeError(f"{what} is on {device}; sparsetarget supports CPU and CUDA tensors")


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a contiguous CPU tensor: the same memory, no copy."""
    if not t.is_contiguous():
        raise ValueError("internal error: a tensor handed to the core must be contiguous")
    return t.detach().numpy()


class PendingUpdate(NamedTuple):
    """What one backward call contributes to the next optimizer step of a head (tensors on the head's device)."""

    H: torch.Tensor  # (m, d) hidden rows in the state dtype, bias column included
    target: SparseTarget
    dA: torch.Tensor  # dL/dA, one per element of HeadOutput.A
    dq: torch.Tensor  # (m,)
    ds: torch.Tensor  # (m,)
    projections: Any  # the engine's projections of H at the forward's weights
    grad_H: torch.Tensor | None  # dL/dH (m, d) when backward computed it, reused by the step


class Engine(Protocol):
    """What the torch front end asks of a backend; all tensors are on the head's device."""

    def set_stabilization(self, **options: Any) -> None: ...
    def forward(self, H: torch.Tensor, target: SparseTarget) -> ForwardResult: ...
    def grad_hidden(self, H: torch.Tensor, target: SparseTarget, dA: torch.Tensor, dq: torch.Tensor,
                    ds: torch.Tensor, projections: Any) -> torch.Tensor: ...
    def step(self, updates: list[PendingUpdate], lr: float, weight_decay: float) -> None: ...
    def refresh(self) -> None: ...
    def stabilize(self) -> dict[str, Any]: ...
    def diagnostics(self) -> dict[str, float]: ...
    def weight(self) -> torch.Tensor: ...
    def logits(self, H: torch.Tensor) -> torch.Tensor: ...
    def topk(self, H: torch.Tensor, k: int, rank: str) -> tuple[torch.Tensor, torch.Tensor]: ...
    def synchronize(self) -> None: ...


def engine_for(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Engine:
    """The engine for state tensors (named as ``STATE_ARRAYS``) on one device, with a stabilisation policy."""
    device = tensors["V"].device
    check_device(device, "FactoredLinear's state")
    if device.type == "cuda":
        from ._cuda_engine import CudaEngine

        return CudaEngine(tensors, config)
    return CpuEngine(tensors, config)


class CpuEngine:
    """The C++ core on zero-copy NumPy views of CPU tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        self.layer = FactoredOutput._wrap({name: as_numpy(tensors[name]) for name in STATE_ARRAYS}, **config)
        self.core = self.layer._core

    def set_stabilization(self, **options: Any) -> None:
        self.layer.set_stabilization(**options)

    def forward(self, H: torch.Tensor, target: SparseTarget) -> ForwardResult:
        csr = target.csr
        A, q, s, projections = self.core.forward(as_numpy(H), csr.indptr, csr.indices, True)
        A_t = torch.from_numpy(A)
        if target.is_class and csr.active is not None:  # one entry per row, 0 on ignored rows
            full = A_t.new_zeros(H.shape[0])
            full[target.valid] = A_t
            A_t = full
        return A_t, torch.from_numpy(q), torch.from_numpy(s), projections

    @staticmethod
    def _entries(target: SparseTarget, dA: torch.Tensor) -> np.ndarray:
        """dL/dA per CSR entry of the core (ignored rows of class targets have none)."""
        a = as_numpy(dA)
        if target.is_class and target.csr.active is not None:
            a = np.ascontiguousarray(a[target.csr.active.astype(bool)])
        return a

    def grad_hidden(self, H: torch.Tensor, target: SparseTarget, dA: torch.Tensor, dq: torch.Tensor,
                    ds: torch.Tensor, projections: Any) -> torch.Tensor:
        csr = target.csr
        grad_H = self.core.grad_hidden(as_numpy(H), csr.indptr, csr.indices, self._entries(target, dA), as_numpy(dq),
                                       as_numpy(ds), projections)
        return torch.from_numpy(grad_H)

    def step(self, updates: list[PendingUpdate], lr: float, weight_decay: float) -> None:
        if len(updates) == 1:
            u = updates[0]
            H, dq, ds = as_numpy(u.H), as_numpy(u.dq), as_numpy(u.ds)
            indptr, indices = u.target.csr.indptr, u.target.csr.indices
            dA = self._entries(u.target, u.dA)
            proj = u.projections
            grad_H = None if u.grad_H is None else as_numpy(u.grad_H)
        else:  # gradient accumulation: the stacked minibatch, one factored step
            H = np.concatenate([as_numpy(u.H) for u in updates])
            csrs = [u.target.csr for u in updates]
            offsets = np.cumsum([0] + [c.indptr[-1] for c in csrs[:-1]])
            indptr = np.concatenate([csrs[0].indptr[:1]] + [c.indptr[1:] + off for c, off in zip(csrs, offsets)])
            indices = np.concatenate([c.indices for c in csrs])
            dA = np.concatenate([self._entries(u.target, u.dA) for u in updates])
            dq = np.concatenate([as_numpy(u.dq) for u in updates])
            ds = np.concatenate([as_numpy(u.ds) for u in updates])
            proj = tuple(np.concatenate([u.projections[i] for u in updates]) for i in range(5))
            known = all(u.grad_H is not None for u in updates)
            grad_H = np.concatenate([as_numpy(u.grad_H) for u in updates]) if known else None
        self.core.backward_step(H, indptr, indices, dA, dq, ds, float(lr), float(weight_decay), proj, grad_H)

    def refresh(self) -> None:
        self.layer.refresh()

    def stabilize(self) -> dict[str, Any]:
        return self.layer.stabilize()

    def diagnostics(self) -> dict[str, float]:
        arrays = self.layer._arrays
        return diagnostics_from(arrays["stats"], arrays["U"], self.core.inverse_error())

    def weight(self) -> torch.Tensor:
        return torch.from_numpy(self.layer.weight())

    def logits(self, H: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.layer.logits(as_numpy(H)))

    def topk(self, H: torch.Tensor, k: int, rank: str) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = self.core.topk(as_numpy(H), k, rank)
        return torch.from_numpy(values), torch.from_numpy(indices)

    def synchronize(self) -> None:
        """Nothing is asynchronous on the CPU."""
