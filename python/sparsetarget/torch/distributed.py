"""Distributed training of factored heads on ``torch.distributed``: data parallel and vocab parallel.

Data parallel (:func:`gather_update`, used by ``FactoredSGD(..., process_group=pg)``): the update of a step is fully
defined by the hidden rows H, the loss derivatives dL/dA, dL/dq, dL/ds and the targets, O(m d + nnz) per rank. Every
rank all-gathers those of all ranks and applies the same stacked update in rank order, so the factored state stays
bit-identical across ranks without ever sending the D x d weight. The derivatives are divided by the group size,
as ``DistributedDataParallel`` averages dense gradients.

Vocab parallel (:class:`VocabShard`, used by ``FactoredLinear(..., vocab_parallel_group=pg)``): rank r keeps a
contiguous block of rows of V, and U, U^-1, omega replicated. The rows of a block form an exact factored layer of
their own, W_r = V_r U + 1_r omega^T, with its own Q_r = W_r^T W_r and w_bar_r = W_r^T 1, given the global loss
derivatives (dL/dA for the targets it owns, the global dL/dq and dL/ds): q = sum_r q_r, s = sum_r s_r and
dL/dH = sum_r of the blocks' partial hidden gradients. The updates of U, U^-1 and omega, and every stabilisation
decision, depend only on H, dL/dq, dL/ds, lr, weight decay and U itself, so they are computed identically on every
rank; Q_r, w_bar_r and V_r follow from each block's own rows. Forward: one all-reduce of nnz + 2m values; backward:
one all-reduce of the m x d hidden gradient; step, stabilisation and refresh: no communication.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .._engine import (
    TILE_ROWS,
    DeviceCSR,
    Engine,
    Recorded,
    _np,
    entries_from_rows,
    log_prob_of_outputs,
    rows_from_entries,
)
from .._targets import CSRTargets
from ._function import HeadCall, graph_alive, records_update, save_call, upstream_derivative


def group_size(group: Any) -> int:
    """Number of ranks in ``group`` (None: the default group)."""
    return dist.get_world_size(group)


def check_group(group: Any, name: str) -> None:
    """Raise unless ``torch.distributed`` is initialised and ``group`` (None: the default group) contains this rank."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{name} needs torch.distributed: call torch.distributed.init_process_group first")
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError(f"{name}: this process (global rank {dist.get_rank()}) is not a member of the group")


def shard_range(out_features: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of V kept by ``rank`` of ``world``: contiguous blocks, the first D % world one row
    longer."""
    base, extra = divmod(out_features, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _gather_padded(t: torch.Tensor, n: int, counts: list[int], group: Any) -> list[torch.Tensor]:
    """All-gather the first dimension of ``t`` (``n`` rows here, ``counts[r]`` rows on rank r), padded to the
    largest count; the pieces of every rank, in rank order."""
    longest = max(counts)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[:n] = t
    pieces = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(pieces, padded, group=group)
    return [piece[:c] for piece, c in zip(pieces, counts)]


def _engine_array(t: torch.Tensor, csr: Any) -> Any:
    """``t`` as the engine's arrays for ``csr``: a NumPy view on the CPU (CSRTargets), the tensor on a GPU."""
    return t.numpy() if isinstance(csr, CSRTargets) else t


def _as_tensor(x: Any) -> torch.Tensor:
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


# ---------------------------------------------------------------------------------------------- data parallel
def gather_update(engine: Engine, records: list[Recorded], group: Any, like: torch.Tensor) -> Recorded | None:
    """The recorded updates of every rank of ``group`` stacked in rank order, with dL/dA, dL/dq, dL/ds divided by
    the group size (DDP's averaging): one update that every rank applies identically; ``like`` is a state tensor of
    the head (the state's dtype and device). None when no rank recorded anything. Each rank contributes
    2 + m + nnz int64 and m d + nnz + 2m floats of the state dtype (padded to the largest rank's)."""
    world = group_size(group)
    d = engine.in_features
    H, counts, indices, dA, dq, ds = [], [], [], [], [], []
    for r in records:
        H.append(_as_tensor(r.H))
        indptr = _as_tensor(r.targets.indptr)
        counts.append(indptr[1:] - indptr[:-1])
        indices.append(_as_tensor(r.targets.indices))
        dA_rows = _np(r.dA) if isinstance(r.targets, CSRTargets) else r.dA
        dA.append(_as_tensor(entries_from_rows(dA_rows, r.targets)))
        dq.append(_as_tensor(r.dq))
        ds.append(_as_tensor(r.ds))
    state_dtype, device = like.dtype, like.device
    m = sum(h.shape[0] for h in H)
    nnz = sum(i.shape[0] for i in indices)
    sizes = torch.tensor([m, nnz], dtype=torch.int64, device=device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    ms = [int(s[0]) for s in all_sizes]
    nnzs = [int(s[1]) for s in all_sizes]
    if sum(ms) == 0:
        return None

    def flat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([p.reshape(-1).to(dtype) for p in parts]) if parts else torch.zeros(
            0, dtype=dtype, device=device)

    floats = torch.cat([flat(H, state_dtype), flat(dA, state_dtype), flat(dq, state_dtype), flat(ds, state_dtype)])
    ints = torch.cat([flat(counts, torch.int64), flat(indices, torch.int64)])
    float_pieces = _gather_padded(floats, floats.shape[0], [mr * d + nr + 2 * mr for mr, nr in zip(ms, nnzs)], group)
    int_pieces = _gather_padded(ints, ints.shape[0], [mr + nr for mr, nr in zip(ms, nnzs)], group)
    H_all, dA_all, dq_all, ds_all, counts_all, indices_all = [], [], [], [], [], []
    for f, i, mr, nr in zip(float_pieces, int_pieces, ms, nnzs):
        H_all.append(f[:mr * d].reshape(mr, d))
        dA_all.append(f[mr * d:mr * d + nr])
        dq_all.append(f[mr * d + nr:mr * d + nr + mr])
        ds_all.append(f[mr * d + nr + mr:])
        counts_all.append(i[:mr])
        indices_all.append(i[mr:])
    H_cat = torch.cat(H_all).contiguous()
    scale = 1.0 / world
    dA_cat = torch.cat(dA_all) * scale
    dq_cat = torch.cat(dq_all) * scale
    ds_cat = torch.cat(ds_all) * scale
    indptr = torch.zeros(H_cat.shape[0] + 1, dtype=torch.int64, device=device)
    torch.cumsum(torch.cat(counts_all), 0, out=indptr[1:])
    indices_cat = torch.cat(indices_all).contiguous()
    if device.type == "cpu":
        csr: Any = CSRTargets(indptr.numpy(), indices_cat.numpy(), np.ones(indices_cat.shape[0]), None, False)
        return Recorded(H_cat, csr, dA_cat, dq_cat, ds_cat, None, None)
    csr = DeviceCSR(indptr, indices_cat, None, False)
    projections = engine.forward(H_cat, csr)[3]  # recomputed on every rank alike: the forward's weights are current
    return Recorded(H_cat, csr, dA_cat, dq_cat, ds_cat, projections, None)


@torch.no_grad()
def broadcast_state(tensors: list[torch.Tensor], group: Any) -> None:
    """Copy the state tensors of the group's first rank to every rank, in place (as DDP does at construction)."""
    src = dist.get_global_rank(group, 0) if group is not None else 0
    for t in tensors:
        dist.broadcast(t, src, group=group)


# ---------------------------------------------------------------------------------------------- vocab parallel
class LocalTargets(NamedTuple):
    """The part of a minibatch's targets that falls in one block of rows."""

    csr: Any  # CSRTargets (CPU) or DeviceCSR (GPU): multi-label form, indices relative to the block
    owned: Any  # positions of the block's entries among the global entries (int64 NumPy array or tensor)
    entries: int  # number of global entries


class VocabShard:
    """The block of rows [start, stop) of a vocab-parallel head and the collectives over its group."""

    def __init__(self, group: Any, out_features: int) -> None:
        check_group(group, "vocab_parallel_group")
        self.group = group
        self.world = group_size(group)
        self.rank = dist.get_rank(group)
        if out_features < self.world:
            raise ValueError(f"out_features={out_features} is smaller than the vocab_parallel_group's size "
                             f"{self.world}: every rank needs at least one row")
        self.out_features = out_features
        self.start, self.stop = shard_range(out_features, self.world, self.rank)
        self.rows = [shard_range(out_features, self.world, r) for r in range(self.world)]

    def __deepcopy__(self, memo: dict) -> VocabShard:
        return self  # a copied head keeps its place in the same process group

    def __getstate__(self) -> dict:
        raise TypeError("a vocab-parallel FactoredLinear cannot be pickled (its process group cannot): save its "
                        "state_dict() instead, on every rank")

    def local_targets(self, csr: Any) -> LocalTargets:
        """The entries of ``csr`` (global targets) whose index lies in this block, as the block's own targets."""
        if isinstance(csr, CSRTargets):
            indices = csr.indices
            own = (indices >= self.start) & (indices < self.stop)
            before = np.concatenate([[0], np.cumsum(own, dtype=np.int64)])
            local = CSRTargets(np.ascontiguousarray(before[csr.indptr]),
                               np.ascontiguousarray(indices[own] - self.start), np.ones(int(before[-1])), None, False)
            return LocalTargets(local, np.flatnonzero(own), indices.shape[0])
        indices = csr.indices
        own = (indices >= self.start) & (indices < self.stop)
        if csr.active is not None:  # class rows on a GPU keep a placeholder entry on ignored rows
            own &= csr.active
        before = torch.cat([own.new_zeros(1, dtype=torch.int64), torch.cumsum(own, 0)])
        owned = torch.nonzero(own).reshape(-1)
        local = DeviceCSR(before[csr.indptr].contiguous(), (indices[owned] - self.start).contiguous(), None, False)
        return LocalTargets(local, owned, indices.shape[0])

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the group, in place."""
        dist.all_reduce(t, group=self.group)
        return t

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """``t`` (the same shape on every rank) of every rank, in rank order."""
        pieces = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(pieces, t.contiguous(), group=self.group)
        return pieces

    def gather_rows(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate along ``dim`` each rank's block (its rows of the output dimension), in rank order."""
        moved = t.movedim(dim, 0).contiguous()
        counts = [stop - start for start, stop in self.rows]
        pieces = _gather_padded(moved, moved.shape[0], counts, self.group)
        return torch.cat(pieces).movedim(0, dim).contiguous()

    def topk(self, engine: Engine, H: torch.Tensor, k: int, by: str, kind: str, eps: float) -> tuple[Any, Any]:
        """Top-k over all D outputs: each block ranks its own rows in tiles, the candidates of all blocks merged."""
        if by not in ("output", "probability"):
            raise ValueError(f"by must be 'output' or 'probability', got {by!r}")
        if not 1 <= k <= self.out_features:
            raise ValueError(f"k must be in [1, D={self.out_features}], got {k}")
        score = _SCORES["output" if by == "output" else kind]
        m = H.shape[0]
        best_scores = H.new_full((m, k), -torch.inf)
        best_values = H.new_zeros((m, k))
        best_indices = torch.full((m, k), -1, dtype=torch.int64, device=H.device)
        for r0 in range(0, self.stop - self.start, TILE_ROWS):
            r1 = min(r0 + TILE_ROWS, self.stop - self.start)
            tile = _as_tensor(engine.logits(H, r0, r1))
            scores = torch.cat([best_scores, score(tile)], dim=1)
            values = torch.cat([best_values, tile], dim=1)
            indices = torch.cat([best_indices, torch.arange(self.start + r0, self.start + r1,
                                                            device=H.device).expand(m, -1)], dim=1)
            best_scores, order = torch.topk(scores, k, dim=1)
            best_values = torch.gather(values, 1, order)
            best_indices = torch.gather(indices, 1, order)
        scores, values, indices = (torch.cat(self.gather(t), dim=1) for t in (best_scores, best_values,
                                                                               best_indices))
        best_scores, order = torch.topk(scores, k, dim=1)
        values, indices = torch.gather(values, 1, order), torch.gather(indices, 1, order)
        if by == "output":
            return values, indices
        q, s = (_as_tensor(x) for x in engine.norms(H))
        qs = self.all_reduce(torch.stack([q, s]))
        return log_prob_of_outputs(kind, values, qs[0][:, None], qs[1][:, None], self.out_features, eps), indices


_SCORES = {
    "output": lambda o: o,
    "spherical_softmax": lambda o: o * o,
    "taylor_softmax": lambda o: 1 + o + o * o / 2,
}


class VocabParallelHeadFunction(torch.autograd.Function):
    """(h, anchor, call, shard) -> (A, q, s) of a vocab-parallel head: the block's outputs at the targets it owns,
    q and s summed over the group (one all-reduce); backward sums the blocks' hidden gradients (one all-reduce)
    and records the block's update (its own targets, the global dL/dq and dL/ds)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, anchor: torch.Tensor, call: HeadCall,  # type: ignore[override]
                shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        csr = call.target.csr
        local = shard.local_targets(csr)
        A_local, q, s, projections = call.engine.forward(call.H, local.csr)
        m = call.H.shape[0]
        packed = call.H.new_zeros(local.entries + 2 * m)
        packed[torch.as_tensor(local.owned, device=packed.device)] = _as_tensor(A_local)
        packed[local.entries:local.entries + m] = _as_tensor(q)
        packed[local.entries + m:] = _as_tensor(s)
        shard.all_reduce(packed)
        A = _as_tensor(rows_from_entries(_engine_array(packed[:local.entries], csr), csr))
        save_call(ctx, h, anchor, call, projections)
        ctx.local = local
        ctx.shard = shard
        return A.clone(), packed[local.entries:local.entries + m].clone(), packed[local.entries + m:].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gA: torch.Tensor | None, gq: torch.Tensor | None,
                 gs: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None, None]:
        graph_alive(ctx)
        call: HeadCall = ctx.call
        local: LocalTargets = ctx.local
        call.check_current()
        H, csr = call.H, call.target.csr
        m = H.shape[0]
        dA = upstream_derivative(gA, call.target.entries, H)
        dq = upstream_derivative(gq, m, H)
        ds = upstream_derivative(gs, m, H)
        dA_entries = _as_tensor(entries_from_rows(_engine_array(dA, csr), csr))
        dA_local = dA_entries[torch.as_tensor(local.owned, device=H.device)].contiguous()
        grad_h = grad_H_local = None
        if ctx.needs_input_grad[0]:
            grad_H_local = _as_tensor(call.engine.grad_hidden(H, local.csr, dA_local, dq, ds, ctx.projections))
            grad_H = ctx.shard.all_reduce(grad_H_local.clone())
            grad_h = grad_H[:, :ctx.in_features].to(ctx.h_dtype, copy=True)
        if records_update(ctx):
            # the block's own partial dL/dH: the step recovers the block's W_r^T z from it (docs/algorithm.md 4.2)
            call.record(Recorded(H, local.csr, dA_local, dq, ds, ctx.projections, grad_H_local))
        return grad_h, None, None, None
