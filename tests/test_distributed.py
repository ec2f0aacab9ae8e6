"""Distributed training on torch.distributed (gloo, CPU, spawned processes): data parallel (FactoredSGD with a
process group, the model in DistributedDataParallel) and vocab parallel (FactoredLinear with a
vocab_parallel_group), each against single-process dense float64 training of the same objective (nn.Linear head,
plain SGD with weight decay; the same body and Adam): losses, body gradients, all weights after every step, and the
ranks bit-identical. Spawning is the slow part, so each job runs many checks in one process group."""

from __future__ import annotations

import copy
import datetime
import os
import pickle
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import sparsetarget.torch as stt  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # the spawned processes import the reference helpers too
from torch_reference import dense_loss, max_rel, torch_targets  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

F64 = torch.float64
D_IN, D_HID, D = 6, 7, 37  # head: d = 7 inputs + bias = 8 columns, D = 37 outputs (odd: uneven vocab blocks)
LR_BODY, LR_HEAD, WD = 0.05, 0.3, 0.01
TOL = 1e-12  # float64; the differences observed are below 1e-13 (sums taken in another order)
OPTS = {"spherical_softmax": {"eps": 0.05}, "taylor_softmax": {}, "squared_error": {}, "z_loss": {"a": 0.7, "b": 1.5}}
STABILIZATION = {"sigma_range": (0.95, 1.05), "refresh_every": 3}  # corrections and refreshes happen in the run


class Net(nn.Module):
    """A small body and a factored head; forward returns the loss (so that DDP sees the whole model)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D_IN, D_HID, dtype=F64), nn.Tanh())
        self.head = head

    def forward(self, x: torch.Tensor, target, loss: str, reduction: str = "mean") -> torch.Tensor:
        return stt.linear_spherical_loss(self.body(x), self.head, target, loss=loss, reduction=reduction,
                                         **OPTS[loss])


class Reference:
    """Single-process dense float64 training: the same body and Adam, an nn.Linear head and torch.optim.SGD."""

    def __init__(self, body_state: dict, W: torch.Tensor, b: torch.Tensor) -> None:
        self.body = nn.Sequential(nn.Linear(D_IN, D_HID, dtype=F64), nn.Tanh())
        self.body.load_state_dict(body_state)
        self.head = nn.Linear(D_HID, D, dtype=F64)
        with torch.no_grad():
            self.head.weight.copy_(W)
            self.head.bias.copy_(b)
        self.adam = torch.optim.Adam(self.body.parameters(), lr=LR_BODY)
        self.sgd = torch.optim.SGD(self.head.parameters(), lr=LR_HEAD, weight_decay=WD)
        self.schedulers = [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
                           for opt in (self.adam, self.sgd)]

    def step(self, batches: list[list[tuple]], scale: float) -> list[list[torch.Tensor]]:
        """One step on ``scale`` * the sum of the losses of ``batches`` (per rank, per micro-batch: (x, target,
        loss, reduction)); returns the losses and leaves the body's gradients for inspection."""
        self.adam.zero_grad()
        self.sgd.zero_grad()
        losses = []
        total = torch.zeros((), dtype=F64)
        for rank_batches in batches:
            losses.append([])
            for x, target, loss, reduction in rank_batches:
                o = self.head(self.body(x))
                value = dense_loss(o, target, loss, OPTS[loss], reduction)
                losses[-1].append(value.detach())
                total = total + scale * value
        total.backward()
        self.grads = [p.grad.clone() for p in self.body.parameters()]
        self.adam.step()
        self.sgd.step()
        for s in self.schedulers:
            s.step()
        return losses


def batch(rng: np.random.Generator, m: int, kind: str, loss: str, reduction: str = "mean") -> tuple:
    x = torch.from_numpy(rng.standard_normal((m, D_IN)))
    target = torch.full((m,), -100) if kind == "all_ignored" else torch_targets(kind, m, D, rng, form="tuple")
    return x, target, loss, reduction


def equal_losses(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within TOL (NaN for NaN: the mean over a batch whose rows are all ignored)."""
    if bool(torch.isnan(b)):
        return bool(torch.isnan(a))
    return max_rel(a.reshape(1), b.reshape(1)) < TOL


def check_against(model: Net, ref: Reference, what: str) -> None:
    body = list(model.body.parameters())
    for p, g in zip(body, ref.grads):
        assert max_rel(p.grad, g) < TOL, f"{what}: body gradient {max_rel(p.grad, g)}"


def check_weights(model: Net, ref: Reference, what: str) -> None:
    for p, q in zip(model.body.parameters(), ref.body.parameters()):
        assert max_rel(p, q) < TOL, f"{what}: body weights {max_rel(p, q)}"
    W, b = model.head.dense_weight(), model.head.dense_bias()
    assert max_rel(W, ref.head.weight) < TOL, f"{what}: head weight {max_rel(W, ref.head.weight)}"
    assert max_rel(b, ref.head.bias) < TOL, f"{what}: head bias {max_rel(b, ref.head.bias)}"


def step_and_check(model: Net, ref: Reference, losses: list, ref_losses: list, steppers: tuple, what: str) -> None:
    """Losses and body gradients against the reference's, then the optimiser and scheduler steps (in order), then
    every weight against the reference's."""
    for a, b in zip(losses, ref_losses):
        assert equal_losses(a, b), f"{what}: loss {a} vs {b}"
    check_against(model, ref, what)
    for stepper in steppers:
        stepper.step()
    check_weights(model, ref, what)


def gathered(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    pieces = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, t.contiguous(), group=group)
    return pieces


def assert_same_on_all_ranks(tensors: list[torch.Tensor], what: str, group=None) -> None:
    for t in tensors:
        pieces = gathered(t, group)
        assert all(torch.equal(p, pieces[0]) for p in pieces), f"{what}: ranks differ"


def initial_head_weights() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (torch.rand(D, D_HID, generator=g, dtype=F64) - 0.5), (torch.rand(D, generator=g, dtype=F64) - 0.5) * 0.2


# ---------------------------------------------------------------------------------------------- data parallel
# Per step: for each rank, the micro-batches (rows, target kind, loss, reduction) accumulated before the step.
DP_STEPS = [
    [[(5, "class_ignore", "spherical_softmax")], [(1, "class", "spherical_softmax")],
     [(9, "class", "spherical_softmax")]],
    [[(4, "csr", "taylor_softmax")], [(6, "csr", "taylor_softmax")], [(2, "csr", "taylor_softmax")]],
    [[(3, "class", "spherical_softmax"), (2, "class_ignore", "spherical_softmax")],
     [(4, "all_ignored", "spherical_softmax"), (3, "class", "spherical_softmax")],
     [(2, "class", "spherical_softmax"), (5, "class", "spherical_softmax")]],
    [[(6, "class", "squared_error")], [(3, "all_ignored", "squared_error")], [(7, "class", "squared_error")]],
    [[(5, "class", "z_loss")], [(4, "class_ignore", "z_loss")], [(3, "class", "z_loss")]],
]


STATE = ("V", "U", "U_inv", "Q", "omega", "w_bar", "probe_max", "probe_min", "stats")


def data_parallel_steps(ddp, model: Net, adam, fsgd, schedulers, ref: Reference, steps: list, seed: int,
                        data_group=None) -> None:
    """Train ``steps`` with rank r of ``data_group`` taking the r-th batches of each step; check every step."""
    rank, world = dist.get_rank(data_group), dist.get_world_size(data_group)
    for i, plan in enumerate(steps):
        rng = np.random.default_rng(seed + i)
        batches = [[batch(rng, m, kind, loss) for m, kind, loss in plan[r % len(plan)]] for r in range(world)]
        adam.zero_grad()
        fsgd.zero_grad()
        losses = []
        mine = batches[rank]
        for j, (x, target, loss, reduction) in enumerate(mine):
            if j < len(mine) - 1:
                with ddp.no_sync():  # gradient accumulation: the body's all-reduce waits for the last micro-batch
                    value = ddp(x, target, loss, reduction)
                    value.backward()
            else:
                value = ddp(x, target, loss, reduction)
                value.backward()
            losses.append(value.detach())
        ref_losses = ref.step(batches, 1.0 / world)
        step_and_check(model, ref, losses, ref_losses[rank], (adam, fsgd, *schedulers), f"data parallel step {i}")
        assert_same_on_all_ranks([getattr(model.head, name) for name in STATE], f"data parallel step {i}",
                                 data_group)


def make_optimizers(model: Net, process_group=None):
    adam = torch.optim.Adam(model.body.parameters(), lr=LR_BODY)
    fsgd = stt.FactoredSGD(model.head, lr=LR_HEAD, weight_decay=WD, process_group=process_group)
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) for opt in (adam, fsgd)]
    return adam, fsgd, schedulers


def data_parallel_job(rank: int, world: int, checkpoint: str) -> None:
    """Train from scratch (world 2) and save a checkpoint on rank 0, or resume from it (world 3)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    W0, b0 = initial_head_weights()
    torch.manual_seed(0)
    model = Net(stt.FactoredLinear(D_HID, D, bias=True, weight=W0, initial_bias=b0, dtype=F64, **STABILIZATION))
    head = model.head
    assert not any("head" in name for name, _ in model.named_buffers())
    assert not any("head" in name for name, _ in model.named_parameters())
    resume = world == 3
    if resume:
        saved = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(saved["model"])
    if rank > 0:  # DDP must leave the factored state alone; FactoredSGD broadcasts it from rank 0
        with torch.no_grad():
            head.V.add_(1.0)
    mine = head.V.clone()
    ddp = DDP(model)  # default arguments: broadcast_buffers=True
    assert torch.equal(head.V, mine), "DDP changed the factored state"
    adam, fsgd, schedulers = make_optimizers(model, process_group=dist.group.WORLD)
    W, b = head.dense_weight(), head.dense_bias()
    if resume:
        adam.load_state_dict(saved["adam"])
        fsgd.load_state_dict(saved["fsgd"])
        for s, state in zip(schedulers, saved["schedulers"]):
            s.load_state_dict(state)
        ref = Reference(saved["ref_body"], saved["ref_W"], saved["ref_b"])
        ref.adam.load_state_dict(saved["ref_adam"])
        ref.sgd.load_state_dict(saved["ref_sgd"])
        for s, state in zip(ref.schedulers, saved["ref_schedulers"]):
            s.load_state_dict(state)
        assert max_rel(W, saved["ref_W"]) < TOL
    else:
        assert torch.equal(W, W0) and torch.equal(b, b0)
        ref = Reference(model.body.state_dict(), W0, b0)
    steps = DP_STEPS[:2] if resume else DP_STEPS
    data_parallel_steps(ddp, model, adam, fsgd, schedulers, ref, steps, seed=100 * world)
    diagnostics = head.diagnostics()
    assert diagnostics["corrections"] > 0 and diagnostics["refreshes"] > 1, diagnostics  # they ran in lock step
    if not resume and rank == 0:
        torch.save({"model": model.state_dict(), "adam": adam.state_dict(), "fsgd": fsgd.state_dict(),
                    "schedulers": [s.state_dict() for s in schedulers], "ref_body": ref.body.state_dict(),
                    "ref_W": ref.head.weight.detach(), "ref_b": ref.head.bias.detach(),
                    "ref_adam": ref.adam.state_dict(), "ref_sgd": ref.sgd.state_dict(),
                    "ref_schedulers": [s.state_dict() for s in ref.schedulers]}, checkpoint)


# ---------------------------------------------------------------------------------------------- vocab parallel
VP_STEPS = [
    [(9, "class_ignore", "spherical_softmax")],
    [(4, "csr", "taylor_softmax"), (1, "csr", "taylor_softmax")],
    [(5, "class", "z_loss")],
    [(3, "all_ignored", "spherical_softmax", "sum"), (6, "class", "spherical_softmax", "sum")],
    [(11, "class", "squared_error")],
]


def vocab_parallel_job(rank: int, world: int, checkpoint: str) -> None:
    """Every rank sees the same batches; rank r keeps a block of the rows of V."""
    W0, b0 = initial_head_weights()
    torch.manual_seed(0)
    head = stt.FactoredLinear(D_HID, D, bias=True, weight=W0, initial_bias=b0, dtype=F64,
                              vocab_parallel_group=dist.group.WORLD, **STABILIZATION)
    start, stop = head.vocab_rows
    assert head.V.shape[0] == stop - start and torch.equal(head.V[:, :D_HID], W0[start:stop])
    model = Net(head)
    adam, fsgd, schedulers = make_optimizers(model)
    ref = Reference(model.body.state_dict(), W0, b0)
    for i, plan in enumerate(VP_STEPS):
        rng = np.random.default_rng(500 + i)
        batches = [batch(rng, *micro) for micro in plan]
        adam.zero_grad()
        fsgd.zero_grad()
        losses = []
        for x, target, loss, reduction in batches:
            value = model(x, target, loss, reduction)
            value.backward()
            losses.append(value.detach())
        ref_losses = ref.step([batches], 1.0)
        step_and_check(model, ref, losses, ref_losses[0], (adam, fsgd, *schedulers), f"vocab parallel step {i}")
        assert_same_on_all_ranks([head.U, head.U_inv, head.omega, head.stats, *model.body.parameters()],
                                 f"vocab parallel step {i}")
    diagnostics = head.diagnostics()
    assert diagnostics["corrections"] > 0 and diagnostics["refreshes"] > 1, diagnostics
    # the inference views gather the blocks
    x = torch.from_numpy(np.random.default_rng(9).standard_normal((4, D_HID)))
    logits = ref.head(x).detach()
    assert max_rel(head.logits(x), logits) < TOL
    values, indices = head.topk(x, 5)
    expect = torch.topk(logits, 5)
    assert torch.equal(indices, expect.indices) and max_rel(values, expect.values) < TOL
    for kind, eps in (("spherical_softmax", 0.05), ("taylor_softmax", 0.0)):
        score = logits * logits + eps if kind == "spherical_softmax" else 1 + logits + logits * logits / 2
        log_p = torch.log(score / score.sum(1, keepdim=True))
        values, indices = head.topk(x, D, by="probability", kind=kind, eps=eps or 0.01)
        expect = torch.topk(log_p, D)
        assert torch.equal(indices, expect.indices) and max_rel(values, expect.values) < TOL
        target = torch.tensor([0, D - 1, 17, -100])
        lp = head.log_prob(x, target, kind=kind, eps=eps or 0.01)
        rows = torch.arange(3)
        assert max_rel(lp[:3], log_p[rows, target[:3]]) < TOL and lp[3] == 0
    twin = copy.deepcopy(head)  # a copy stays in the group: its views gather like the original's
    assert torch.equal(twin.dense_weight(), head.dense_weight()) and twin.V.data_ptr() != head.V.data_ptr()
    with pytest.raises(TypeError, match="vocab-parallel FactoredLinear cannot be pickled.*state_dict"):
        pickle.dumps(head)
    lin = head.to_linear()
    assert torch.equal(lin.weight, head.dense_weight()) and torch.equal(lin.bias, head.dense_bias())
    # the whole layer's checkpoint, saved with 2 ranks, loads into 3 blocks and into an unsharded head
    whole_path = os.path.join(os.path.dirname(checkpoint), "vocab_parallel.pt")
    if world == 3:
        saved = torch.load(whole_path, weights_only=False)
        fresh = stt.FactoredLinear(D_HID, D, bias=True, dtype=F64, vocab_parallel_group=dist.group.WORLD)
        fresh.load_state_dict(saved["head"])
        plain = stt.FactoredLinear(D_HID, D, bias=True, dtype=F64)
        plain.load_state_dict(saved["head"])
        for other in (fresh, plain):
            assert max_rel(other.dense_weight(), saved["W"]) < TOL and max_rel(other.dense_bias(), saved["b"]) < TOL
            Wb = torch.cat([saved["W"], saved["b"][:, None]], dim=1)
            assert max_rel(other.unsharded_state_dict()["Q"], Wb.T @ Wb) < TOL
    whole = head.unsharded_state_dict()
    if world == 2 and rank == 0:
        torch.save({"head": whole, "W": ref.head.weight.detach(), "b": ref.head.bias.detach()}, whole_path)
    # a block loads into the same rank of a group of the same size, not another block
    state = head.state_dict()
    head.load_state_dict(state)
    shifted = dict(state)
    shifted["_extra_state"] = {**state["_extra_state"], "vocab_rows": [start + 1, stop + 1]}
    with pytest.raises(RuntimeError, match="holds the rows"):
        head.load_state_dict(shifted)
    # data parallel over the head's own vocab-parallel group would overwrite every block with the first rank's
    with pytest.raises(ValueError, match="vocab-parallel group"):
        stt.FactoredSGD(head, lr=0.1, process_group=dist.group.WORLD)
    # heads drawn differently on each rank start from the first rank's weights, given at first or added later
    torch.manual_seed(rank)
    first, later = stt.FactoredLinear(D_HID, 7, dtype=F64), stt.FactoredLinear(D_HID, 7, dtype=F64)
    assert not torch.equal(gathered(later.V)[0], gathered(later.V)[1])
    opt = stt.FactoredSGD(first, lr=0.1, process_group=dist.group.WORLD)
    opt.add_param_group({"params": later})
    assert_same_on_all_ranks([first.V, first.Q, later.V, later.Q], "heads of a data-parallel FactoredSGD")


def two_dimensional_job(rank: int, world: int, checkpoint: str) -> None:
    """Data x vocab: ranks (a, v) = divmod(rank, 2); the vocab groups {0, 1}, {2, 3} each hold the whole V in two
    blocks and see the same batches, the data groups {0, 2}, {1, 3} average their updates and body gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    vocab_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    data_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    a, v = divmod(rank, 2)
    W0, b0 = initial_head_weights()
    torch.manual_seed(0)
    model = Net(stt.FactoredLinear(D_HID, D, bias=True, weight=W0, initial_bias=b0, dtype=F64,
                                   vocab_parallel_group=vocab_groups[a], **STABILIZATION))
    ddp = DDP(model, process_group=data_groups[v])
    adam, fsgd, schedulers = make_optimizers(model, process_group=data_groups[v])
    ref = Reference(model.body.state_dict(), W0, b0)
    data_parallel_steps(ddp, model, adam, fsgd, schedulers, ref, DP_STEPS[:3], seed=700, data_group=data_groups[v])
    assert_same_on_all_ranks([model.head.U, model.head.U_inv, model.head.omega, *model.body.parameters()], "2-D")


# ---------------------------------------------------------------------------------------------- the harness
def _run(rank: int, world: int, init_file: str, checkpoint: str, jobs: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        for job in jobs:
            JOBS[job](rank, world, checkpoint)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every check of this rank passed. Leave without the interpreter's teardown: in about one run in ten a child
    # aborted there ("terminate called without an active exception", no Python frame left) after its work was done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


JOBS = {"data_parallel": data_parallel_job, "vocab_parallel": vocab_parallel_job, "2-D": two_dimensional_job}


def spawn(world: int, tmp_path, jobs: tuple[str, ...]) -> None:
    init_file = str(tmp_path / f"init_{world}")
    mp.spawn(_run, args=(world, init_file, str(tmp_path / "checkpoint.pt"), jobs), nprocs=world, join=True)


def test_data_and_vocab_parallel_train_like_one_process_and_resume_on_another_world_size(tmp_path):
    spawn(2, tmp_path, ("data_parallel", "vocab_parallel"))  # trains, saves a checkpoint from rank 0
    spawn(3, tmp_path, ("data_parallel", "vocab_parallel"))  # resumes it on 3 ranks


def test_data_times_vocab_parallel_trains_like_one_process(tmp_path):
    spawn(4, tmp_path, ("2-D",))


def test_blocks_of_rows_cover_the_outputs_in_order():
    from sparsetarget.torch.distributed import shard_range

    for D_, world in ((37, 3), (5, 5), (1000, 7), (8, 2)):
        blocks = [shard_range(D_, world, r) for r in range(world)]
        assert blocks[0][0] == 0 and blocks[-1][1] == D_
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        sizes = [stop - start for start, stop in blocks]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_distributed_options_need_an_initialised_process_group():
    assert not dist.is_initialized()
    head = stt.FactoredLinear(4, 9)
    with pytest.raises(RuntimeError, match="process_group needs torch.distributed: call .*init_process_group"):
        stt.FactoredSGD(head, lr=0.1, process_group=object())
    with pytest.raises(RuntimeError, match="vocab_parallel_group needs torch.distributed"):
        stt.FactoredLinear(4, 9, vocab_parallel_group=object())
