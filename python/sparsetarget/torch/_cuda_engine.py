"""The CUDA engine: the factored head on a GPU, through the CUDA backend ``sparsetarget._cuda``.

Tensors are handed over by address after their dtype, device, shape and contiguity were checked here; outputs are
allocated by torch (its caching allocator, on the current stream) and written by the backend, which queues all
its work on ``torch.cuda.current_stream()``. A training step (forward, backward, optimizer step) never waits for
the device, so it can be captured in a CUDA graph once one step has run (the backend's scratch then exists).

Errors that only the device can see are reported by the next call on the head once the failing work has run:
a singular update factor, NaN or inf in a step, or a class index outside [0, D) in targets that live on the GPU.
The failing step and any step queued after it change nothing, so the state is the one before that step;
``FactoredLinear.synchronize()`` waits and reports at once. Corrections asked for by the monitoring run after the
following step (they keep W). Dense helpers (``dense_weight``, ``logits``, ``topk``) use torch's own matmul on
row tiles of V. TF32 follows ``torch.backends.cuda.matmul.allow_tf32``.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _cuda_module
from ..layer import STATE_ARRAYS, diagnostics_from, stabilization_updates
from ._backend import ForwardResult, PendingUpdate
from ._target import SparseTarget

_TILE_ROWS = 65536  # rows of V per tile in the dense helpers


def _address(t: torch.Tensor) -> int:
    if not t.is_contiguous():
        raise ValueError("internal error: a tensor handed to the CUDA backend must be contiguous")
    return t.data_ptr()


class CudaEngine:
    """The CUDA backend working in place on a head's state tensors (all on one CUDA device)."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        cuda = _cuda_module()
        self.tensors = {name: tensors[name] for name in STATE_ARRAYS}
        V, U = self.tensors["V"], self.tensors["U"]
        self.device = V.device
        for name, t in self.tensors.items():
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, expected {self.device} like V")
        addresses = cuda.StateAddresses(*(_address(self.tensors[name]) for name in STATE_ARRAYS))
        with torch.cuda.device(self.device):
            self.core = cuda.CudaCore(addresses, V.shape[0], V.shape[1], V.dtype == torch.float64,
                                      U.dtype == torch.float64, self.device.index or 0)
        self.set_stabilization(**config)

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def set_stabilization(self, **options: Any) -> None:
        for name, value in stabilization_updates(**options).items():
            setattr(self.core, name, value)

    # ------------------------------------------------------------------ training
    def forward(self, H: torch.Tensor, target: SparseTarget) -> ForwardResult:
        m, d = H.shape
        indptr, indices = target.csr.indptr, target.csr.indices
        nnz = indices.numel()
        new = dict(dtype=H.dtype, device=self.device)
        A, q, s, Hw = (torch.empty(n, **new) for n in (nnz, m, m, m))
        UH, HQ = torch.empty(m, d, **new), torch.empty(m, d, **new)
        self.core.forward(self._stream(), _address(H), m, _address(indptr), _address(indices), nnz, _address(A),
                          _address(q), _address(s), _address(UH), _address(HQ), _address(Hw))
        if target.is_class:  # one entry per row; ignored rows carry a placeholder index
            A = torch.where(target.valid, A, A.new_zeros(()))
        return A, q, s, (UH, HQ, q, s, Hw)

    @staticmethod
    def _entries(target: SparseTarget, dA: torch.Tensor) -> torch.Tensor:
        """dL/dA per CSR entry: ignored rows of class targets contribute nothing."""
        return torch.where(target.valid, dA, dA.new_zeros(())) if target.is_class else dA

    def grad_hidden(self, H: torch.Tensor, target: SparseTarget, dA: torch.Tensor, dq: torch.Tensor,
                    ds: torch.Tensor, projections: Any) -> torch.Tensor:
        m, d = H.shape
        dA = self._entries(target, dA)
        grad_H = torch.empty(m, d, dtype=H.dtype, device=self.device)
        csr = target.csr
        self.core.grad_hidden(self._stream(), _address(H), m, _address(csr.indptr), _address(csr.indices),
                              csr.indices.numel(), _address(dA), _address(dq), _address(ds),
                              [_address(p) for p in projections], _address(grad_H))
        return grad_H

    def step(self, updates: list[PendingUpdate], lr: float, weight_decay: float) -> None:
        if len(updates) == 1:
            u = updates[0]
            H, dq, ds, proj, grad_H = u.H, u.dq, u.ds, u.projections, u.grad_H
            indptr, indices = u.target.csr.indptr, u.target.csr.indices
            dA = self._entries(u.target, u.dA)
        else:  # gradient accumulation: the stacked minibatch, one factored step (sizes are known on the host)
            H = torch.cat([u.H for u in updates])
            parts, offset = [updates[0].target.csr.indptr[:1]], 0
            for u in updates:
                parts.append(u.target.csr.indptr[1:] + offset)
                offset += u.target.csr.indices.numel()
            indptr = torch.cat(parts)
            indices = torch.cat([u.target.csr.indices for u in updates])
            dA = torch.cat([self._entries(u.target, u.dA) for u in updates])
            dq = torch.cat([u.dq for u in updates])
            ds = torch.cat([u.ds for u in updates])
            proj = tuple(torch.cat([u.projections[i] for u in updates]) for i in range(5))
            known = all(u.grad_H is not None for u in updates)
            grad_H = torch.cat([u.grad_H for u in updates]) if known else None
        known = grad_H is not None
        if grad_H is None:
            grad_H = torch.empty_like(H)
        self.core.tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
        self.core.backward_step(self._stream(), _address(H), H.shape[0], _address(indptr), _address(indices),
                                indices.numel(), _address(dA), _address(dq), _address(ds),
                                [_address(p) for p in proj], float(lr), float(weight_decay), _address(grad_H), known)

    # ------------------------------------------------------------------ maintenance (these synchronise)
    def synchronize(self) -> None:
        self.core.synchronize(self._stream())

    def refresh(self) -> None:
        self.core.refresh(self._stream())

    def stabilize(self) -> dict[str, Any]:
        return dict(self.core.correct(self._stream()))

    def diagnostics(self) -> dict[str, float]:
        self.synchronize()
        error = self.core.inverse_error(self._stream())
        return diagnostics_from(self.tensors["stats"].cpu().numpy(), self.tensors["U"].double().cpu().numpy(), error)

    # ------------------------------------------------------------------ dense views, in row tiles of V
    def weight(self) -> torch.Tensor:
        self.poll()
        V, U, omega = self.tensors["V"], self.tensors["U"], self.tensors["omega"]
        out = torch.empty_like(V)
        for r0 in range(0, V.shape[0], _TILE_ROWS):
            tile = V[r0:r0 + _TILE_ROWS].to(U.dtype)
            out[r0:r0 + _TILE_ROWS] = torch.addmm(omega.unsqueeze(0), tile, U)
        return out

    def _logit_tiles(self, H: torch.Tensor):  # type: ignore[no-untyped-def]
        self.poll()
        V, U, omega = self.tensors["V"], self.tensors["U"], self.tensors["omega"]
        UH = H @ U.T
        Hw = (H @ omega).unsqueeze(1)
        for r0 in range(0, V.shape[0], _TILE_ROWS):
            yield r0, torch.addmm(Hw, UH, V[r0:r0 + _TILE_ROWS].to(H.dtype).T)

    def logits(self, H: torch.Tensor) -> torch.Tensor:
        return torch.cat([tile for _, tile in self._logit_tiles(H)], dim=1)

    def topk(self, H: torch.Tensor, k: int, rank: str) -> tuple[torch.Tensor, torch.Tensor]:
        D = self.tensors["V"].shape[0]
        if not 1 <= k <= D:
            raise ValueError(f"k must be in [1, D={D}], got {k}")
        score = {"output": lambda o: o, "square": lambda o: o * o, "taylor": lambda o: 1 + o + o * o / 2}[rank]
        best_scores = best_values = best_indices = None
        for r0, tile in self._logit_tiles(H):
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

    def poll(self) -> None:
        """Raise the error of an earlier step if the device has reported one (never waits)."""
        self.core.poll(self._stream())
