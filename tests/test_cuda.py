"""The CUDA backend against the CPU backend, and what only the GPU has: asynchronous error reports, determinism,
CUDA-graph capture, half-precision inputs and scratch memory that does not grow with D. Skipped without a usable
GPU (see conftest: on a machine with a GPU, skipping them all fails the run)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import sparsetarget as st  # noqa: E402
import sparsetarget.torch as stt  # noqa: E402
from conftest import cuda_state  # noqa: E402
from reference import LOSSES  # noqa: E402
from torch_reference import max_rel, to_device, torch_targets  # noqa: E402

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _needs_gpu():
    _, usable, reason = cuda_state()
    if not usable:
        pytest.skip(f"CUDA backend not usable: {reason}")


D, D_IN = 53, 7


def twin_heads(dtype=torch.float64, state_dtype=None, bias=True, seed=0, D=D, d_in=D_IN):
    torch.manual_seed(seed)
    cpu = stt.FactoredLinear(d_in, D, bias=bias, dtype=dtype, state_dtype=state_dtype)
    gpu = stt.FactoredLinear(d_in, D, bias=bias, dtype=dtype, state_dtype=state_dtype, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


def run(head, batches, lr=0.2, weight_decay=0.05, loss="spherical_softmax"):
    opt = stt.FactoredSGD(head, lr=lr, weight_decay=weight_decay)
    device = head.V.device
    losses, grads = [], []
    for h, y in batches:
        opt.zero_grad()
        x = h.to(device=device, dtype=head.V.dtype).requires_grad_(True)
        L = stt.linear_spherical_loss(x, head, to_device(y, device), loss=loss, reduction="sum")
        L.backward()
        opt.step()
        losses.append(L.detach())
        grads.append(x.grad)
    head.synchronize()
    return losses, grads


def make_batches(kind, seed=1, sizes=(1, 5, 12, 3), D=D, d_in=D_IN):
    rng = np.random.default_rng(seed)
    return [(torch.from_numpy(rng.standard_normal((m, d_in))), torch_targets(kind, m, D, rng, form="tuple"))
            for m in sizes]


@pytest.mark.parametrize("kind", ["class", "class_ignore", "csr"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_cuda_matches_cpu_float64(kind, loss):
    cpu, gpu = twin_heads()
    batches = make_batches(kind)
    lc, gc = run(cpu, batches, loss=loss)
    lg, gg = run(gpu, batches, loss=loss)
    for a, b in zip(lg + gg, lc + gc):
        assert max_rel(a, b) < 1e-11
    assert max_rel(gpu.dense_weight(), cpu.dense_weight()) < 1e-11
    assert max_rel(gpu.dense_bias(), cpu.dense_bias()) < 1e-11
    assert gpu.diagnostics()["steps"] == cpu.diagnostics()["steps"] == len(batches)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu_float32(state_dtype):
    cpu, gpu = twin_heads(dtype=torch.float32, state_dtype=state_dtype)
    batches = make_batches("class", sizes=(16, 3, 40, 1, 9))
    run(cpu, batches)
    run(gpu, batches)
    assert max_rel(gpu.dense_weight(), cpu.dense_weight()) < 1e-4


def test_deterministic():
    """Two runs with duplicate targets across and within rows give bit-identical states."""
    _, a = twin_heads(seed=3)
    _, b = twin_heads(seed=3)
    batches = make_batches("csr", seed=5, sizes=(64, 64))
    run(a, batches)
    run(b, batches)
    for name in st.layer.STATE_ARRAYS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_logits_topk_and_dense_weight_match_cpu():
    cpu, gpu = twin_heads()
    run(cpu, make_batches("class"))
    run(gpu, make_batches("class"))
    h = torch.randn(4, D_IN, dtype=torch.float64)
    assert max_rel(gpu.logits(h.cuda()), cpu.logits(h)) < 1e-11
    tg, tc = gpu.topk(h.cuda(), 5), cpu.topk(h, 5)
    assert torch.equal(tg.indices.cpu(), tc.indices)
    assert max_rel(tg.values, tc.values) < 1e-11
    for kind in ("spherical_softmax", "taylor_softmax"):
        tg, tc = gpu.topk(h.cuda(), 5, by="probability", kind=kind), cpu.topk(h, 5, by="probability", kind=kind)
        assert torch.equal(tg.indices.cpu(), tc.indices)
        assert max_rel(tg.values, tc.values) < 1e-11


def test_singular_step_is_reported_and_changes_nothing():
    _, gpu = twin_heads(bias=False)
    run(gpu, make_batches("class", sizes=(4,)))
    snap = {name: getattr(gpu, name).clone() for name in st.layer.STATE_ARRAYS}
    # squared error with reduction "sum": dL/dq = 1, so M = I - 2 lr h h^T is singular at lr = 1 / (2 ||h||^2)
    h = torch.randn(1, D_IN, dtype=torch.float64, device="cuda")
    opt = stt.FactoredSGD(gpu, lr=float(1 / (2 * h.square().sum())))
    y = torch.randint(0, D, (1,), device="cuda")
    stt.linear_spherical_loss(h, gpu, y, loss="squared_error", reduction="sum").backward()
    opt.step()  # queued; the device finds the factor singular and commits nothing
    with pytest.raises(st.SingularUpdateError, match="not applied"):
        gpu.synchronize()
    for name, value in snap.items():
        assert torch.equal(getattr(gpu, name), value), name
    gpu.synchronize()  # reported once, then cleared


def test_bad_class_index_on_the_device_is_reported():
    _, gpu = twin_heads(bias=False)
    snap = {name: getattr(gpu, name).clone() for name in st.layer.STATE_ARRAYS}
    opt = stt.FactoredSGD(gpu, lr=0.1)
    h = torch.randn(3, D_IN, dtype=torch.float64, device="cuda")
    y = torch.tensor([0, D + 4, 1], device="cuda")
    with pytest.raises(ValueError, match="out of range"):  # raised by whichever call sees the device's report
        stt.linear_spherical_loss(h, gpu, y).backward()
        opt.step()
        gpu.synchronize()
    for name, value in snap.items():
        assert torch.equal(getattr(gpu, name), value), name


def test_half_precision_inputs():
    _, gpu = twin_heads(dtype=torch.float32)
    _, ref = twin_heads(dtype=torch.float32)
    h = torch.randn(8, D_IN, device="cuda")
    y = torch.randint(0, D, (8,), device="cuda")
    for dtype in (torch.bfloat16, torch.float16):
        a = gpu(h.to(dtype), y)
        b = ref(h.to(dtype).float(), y)
        assert max_rel(a.A, b.A) < 1e-6 and max_rel(a.q, b.q) < 1e-6
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x = torch.nn.functional.linear(h, torch.eye(D_IN, device="cuda"))
        out = gpu(x, y)
    assert out.A.dtype == torch.float32


def test_scratch_does_not_grow_with_D():
    sizes = {}
    for D_big in (1000, 200_000):
        _, gpu = twin_heads(dtype=torch.float32, D=D_big, d_in=64, bias=False)
        run(gpu, make_batches("class", sizes=(256,), D=D_big, d_in=64))
        sizes[D_big] = gpu._engine().core.workspace_bytes
    assert sizes[1000] == sizes[200_000]


def test_step_captured_in_a_cuda_graph_matches_eager():
    """forward + backward + optimizer step in one CUDA graph, replayed on new data, equals the eager steps."""
    m = 32
    _, eager = twin_heads(dtype=torch.float32, bias=False)
    _, graphed = twin_heads(dtype=torch.float32, bias=False)
    opt_e = stt.FactoredSGD(eager, lr=0.1)
    opt_g = stt.FactoredSGD(graphed, lr=0.1)
    rng = np.random.default_rng(0)
    data = [(torch.from_numpy(rng.standard_normal((m, D_IN)).astype(np.float32)).cuda(),
             torch.from_numpy(rng.integers(0, D, m)).cuda()) for _ in range(6)]
    static_h, static_y = data[0][0].clone(), data[0][1].clone()

    def step(head, opt, h, y):
        opt.zero_grad()
        stt.linear_spherical_loss(h, head, y).backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the backend's scratch and cuBLAS state exist before capture
        step(graphed, opt_g, static_h, static_y)
    torch.cuda.current_stream().wait_stream(side)
    step(eager, opt_e, *data[0])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed, opt_g, static_h, static_y)
    for h, y in data[1:]:
        static_h.copy_(h)
        static_y.copy_(y)
        graph.replay()
        step(eager, opt_e, h, y)
    torch.cuda.synchronize()
    assert max_rel(graphed.dense_weight(), eager.dense_weight()) < 1e-5
    assert graphed.diagnostics()["steps"] == eager.diagnostics()["steps"] == 6  # warm-up + 5 replays
