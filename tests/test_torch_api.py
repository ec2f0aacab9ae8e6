"""The torch front end: gradcheck, state round trips, zero-copy hand-off, inference helpers, optimizer rules and
bad input (clear errors, state unchanged)."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import sparsetarget as st  # noqa: E402
import sparsetarget.torch as stt  # noqa: E402
from sparsetarget._engine import check_device  # noqa: E402
from torch import nn  # noqa: E402
from torch_reference import dense_loss, max_rel, torch_targets  # noqa: E402

D, D_IN = 29, 5


def make_head(bias=True, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    return stt.FactoredLinear(D_IN, D, bias=bias, dtype=dtype, **kwargs)


def state_snapshot(head):
    return {k: v.clone() for k, v in head.state_dict().items() if isinstance(v, torch.Tensor)}


def assert_state_equal(head, snapshot):
    for k, v in head.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, snapshot[k]), k


def train(head, opt, rng, steps, m=6, loss="spherical_softmax", kind="class"):
    for _ in range(steps):
        h = torch.from_numpy(rng.standard_normal((m, D_IN))).to(head.V.dtype)
        y = torch_targets(kind, m, D, rng)
        opt.zero_grad()
        stt.linear_spherical_loss(h, head, y, loss=loss).backward()
        opt.step()


# ---------------------------------------------------------------------- autograd
@pytest.mark.parametrize("kind", ["class", "class_ignore", "csr"])
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck_function(kind, bias):
    head = make_head(bias).requires_grad_(False)
    rng = np.random.default_rng(0)
    m = 4
    target = torch_targets(kind, m, D, rng, form="tuple")
    h = torch.from_numpy(rng.standard_normal((m, D_IN))).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: tuple(head(x, target)[:3]), (h,))


@pytest.mark.parametrize("loss", ["squared_error", "spherical_softmax", "taylor_softmax", "z_loss"])
def test_gradcheck_losses(loss):
    head = make_head().requires_grad_(False)
    rng = np.random.default_rng(1)
    target = torch_targets("class_ignore", 5, D, rng)
    h = torch.from_numpy(rng.standard_normal((5, D_IN))).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: stt.linear_spherical_loss(x, head, target, loss=loss), (h,))


def test_outputs_match_dense_and_leading_dims():
    head = make_head()
    linear = head.to_linear()
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((2, 3, D_IN)))
    y = torch.from_numpy(rng.integers(0, D, (2, 3)))
    y[1, 2] = -100
    with torch.no_grad():
        out = head(x, y)
        o = linear(x).reshape(6, D)
        valid = y.reshape(-1) != -100
        assert max_rel(out.A[valid], o[valid].gather(1, y.reshape(-1)[valid][:, None])[:, 0]) < 1e-13
        assert out.A[~valid].eq(0).all()
        assert max_rel(out.q, (o * o).sum(1)) < 1e-13 and max_rel(out.s, o.sum(1)) < 1e-13
        per_row = stt.linear_spherical_loss(x, head, y, reduction="none")
        assert per_row.shape == (2, 3) and per_row[1, 2] == 0
        ref = dense_loss(o, y.reshape(-1), "spherical_softmax", {}, "none", lead_shape=(2, 3))
        assert max_rel(per_row, ref) < 1e-13


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_input_without_grad_trains_head_like_dense(reduction):
    """A frozen body (input not requiring grad) still trains the head, as nn.Linear would: the fused loss computes
    dL/dH in its forward for the step alone. Upstream gradients other than 1 scale it per row."""
    head = make_head()
    linear = head.to_linear()
    opt = stt.FactoredSGD(head, lr=0.5, weight_decay=0.1)
    sgd = torch.optim.SGD(linear.parameters(), lr=0.5, weight_decay=0.1)
    rng = np.random.default_rng(3)
    for m in (1, 3, 8, 5):
        h = torch.from_numpy(rng.standard_normal((m, D_IN)))
        y = torch_targets("class_ignore", m, D, rng)
        upstream = torch.from_numpy(rng.uniform(0.5, 2.0, m)) if reduction == "none" else torch.tensor(1.7)
        for o in (opt, sgd):
            o.zero_grad()
        stt.linear_spherical_loss(h, head, y, eps=0.01, reduction=reduction).backward(upstream)
        dense_loss(linear(h), y, "spherical_softmax", {"eps": 0.01}, reduction).backward(upstream)
        opt.step()
        sgd.step()
    assert max_rel(head.dense_weight(), linear.weight) < 1e-12
    assert max_rel(head.dense_bias(), linear.bias) < 1e-12
    assert max_rel(head.dense_weight(), make_head().dense_weight()) > 1e-3  # it trained


def test_fused_loss_computes_grad_h_only_when_a_backward_can_follow(monkeypatch):
    """The fused forward computes dL/dH only with grad mode on and the input or the head needing it; without, the
    loss value is the same and nothing is recorded."""
    from sparsetarget._engine import CpuEngine

    asked = []
    forward_loss = CpuEngine.forward_loss

    def spy(self, H, targets, spec, with_grad, copy_hidden=False):
        asked.append(with_grad)
        return forward_loss(self, H, targets, spec, with_grad, copy_hidden)

    monkeypatch.setattr(CpuEngine, "forward_loss", spy)
    head = make_head()
    stt.FactoredSGD(head, lr=0.1)
    h = torch.randn(4, D_IN, dtype=torch.float64)
    y = torch.tensor([1, 2, -100, 4])
    L = stt.linear_spherical_loss(h, head, y)
    with torch.no_grad():
        L_eval = stt.linear_spherical_loss(h.requires_grad_(True), head, y)
    assert L_eval.item() == L.detach().item() and head.pending_updates == 0
    head.requires_grad_(False)
    stt.linear_spherical_loss(h.detach(), head, y)  # nothing needs a gradient
    stt.linear_spherical_loss(h, head, y).backward()  # the input does
    assert asked == [True, False, False, True]
    assert head.pending_updates == 0 and h.grad is not None


def test_step_hooks_run_once_and_the_profiler_sees_the_step():
    head = make_head()
    opt = stt.FactoredSGD(head, lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    try:
        stt.linear_spherical_loss(torch.randn(3, D_IN, dtype=torch.float64), head, torch.tensor([1, 2, 3])).backward()
        opt.step()
    finally:
        handle.remove()
    assert calls == ["pre", "post"] and head.pending_updates == 0
    opt.zero_grad()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        stt.linear_spherical_loss(torch.randn(3, D_IN, dtype=torch.float64), head, torch.tensor([1, 2, 3])).backward()
        opt.step()
    assert "Optimizer.step#FactoredSGD.step" in {e.name for e in prof.events()}


def test_class_labels_of_any_integer_dtype_or_layout_give_the_same_loss():
    head = make_head().requires_grad_(False)
    h = torch.randn(5, D_IN, dtype=torch.float64)
    y = torch.tensor([[3, 0], [7, 1], [-100, 2], [28, 3], [0, 4]])[:, 0]  # a strided view
    ref = stt.linear_spherical_loss(h, head, y.contiguous(), reduction="none")
    for labels in (y, y.to(torch.int32), y.to(torch.int16)):
        assert torch.equal(stt.linear_spherical_loss(h, head, labels, reduction="none"), ref)
    with pytest.raises(ValueError, match=r"target contains class 29, outside \[0, 29\) and not ignore_index=-100"):
        stt.linear_spherical_loss(h, head, torch.tensor([1, 2, 29, 0, 0]))


def test_half_precision_input():
    """bf16 / fp16 activations are computed in float32 (the state dtype) and get a gradient in their dtype."""
    head = make_head(dtype=torch.float32)
    rng = np.random.default_rng(3)
    h32 = torch.from_numpy(rng.standard_normal((7, D_IN)).astype(np.float32))
    y = torch_targets("class", 7, D, rng)
    for dtype in (torch.bfloat16, torch.float16):
        h = h32.to(dtype).requires_grad_(True)
        ref = h.detach().float().requires_grad_(True)
        loss = stt.linear_spherical_loss(h, head.requires_grad_(False), y)
        loss_ref = stt.linear_spherical_loss(ref, head, y)
        assert loss.dtype == torch.float32 and torch.equal(loss, loss_ref)
        loss.backward()
        loss_ref.backward()
        assert h.grad.dtype == dtype and torch.equal(h.grad, ref.grad.to(dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        body = nn.Linear(D_IN, D_IN)
        h = body(h32)
        assert h.dtype == torch.bfloat16
        stt.linear_spherical_loss(h, head, y).backward()
    assert body.weight.grad is not None and torch.isfinite(body.weight.grad).all()


# ---------------------------------------------------------------------- inference helpers
def test_dense_views_logits_topk_log_prob():
    head = make_head()
    opt = stt.FactoredSGD(head, lr=0.3)
    train(head, opt, np.random.default_rng(4), steps=3)
    linear = head.to_linear()
    assert isinstance(linear, nn.Linear) and linear.weight.dtype == torch.float64
    assert torch.equal(linear.weight, head.dense_weight()) and torch.equal(linear.bias, head.dense_bias())
    x = torch.randn(2, 3, D_IN, dtype=torch.float64)
    with torch.no_grad():
        o = linear(x)
    assert max_rel(head.logits(x), o) < 1e-13
    top = head.topk(x, 4)
    ref = torch.topk(o, 4)
    assert torch.equal(top.indices, ref.indices) and max_rel(top.values, ref.values) < 1e-13
    y = torch.randint(0, D, (2, 3))
    lp = head.log_prob(x, y)
    num = o * o + 1e-2
    ref_lp = torch.log(num / num.sum(-1, keepdim=True)).gather(-1, y[..., None])[..., 0].reshape(-1)
    assert max_rel(lp, ref_lp) < 1e-12
    lp_t = head.log_prob(x, y, "taylor_softmax")
    num = 1 + o + o * o / 2
    ref_t = torch.log(num / num.sum(-1, keepdim=True)).gather(-1, y[..., None])[..., 0].reshape(-1)
    assert max_rel(lp_t, ref_t) < 1e-12
    with pytest.raises(ValueError, match="kind"):
        head.log_prob(x, y, "softmax")
    for kind, num in (("spherical_softmax", o * o + 0.25), ("taylor_softmax", 1 + o + o * o / 2)):
        top_p = head.topk(x, 6, by="probability", kind=kind, eps=0.25)
        ref_p = torch.topk(num, 6)
        assert torch.equal(top_p.indices, ref_p.indices), kind
        log_p = torch.log(num / num.sum(-1, keepdim=True)).gather(-1, ref_p.indices)
        assert max_rel(top_p.values, log_p) < 1e-12, kind
    with pytest.raises(ValueError, match="by must"):
        head.topk(x, 3, by="p")
    for k in (2.5, True, torch.tensor(True)):
        with pytest.raises(TypeError, match="k must"):
            head.topk(x, k)
    assert torch.equal(head.topk(x, torch.tensor(4)).indices, top.indices)
    assert torch.equal(head.topk(x, np.int32(4)).indices, top.indices)
    assert make_head(bias=False).dense_bias() is None


def test_from_linear_and_weight_argument():
    torch.manual_seed(5)
    linear = nn.Linear(D_IN, D)
    head = stt.FactoredLinear.from_linear(linear)
    assert head.V.dtype == torch.float32 and head.has_bias
    assert torch.equal(head.dense_weight(), linear.weight.detach())
    assert max_rel(head.dense_bias(), linear.bias) == 0
    w = torch.randn(D, D_IN, dtype=torch.float64)
    head2 = stt.FactoredLinear(D_IN, D, weight=w, dtype=torch.float64)
    assert torch.equal(head2.dense_weight(), w)
    bound = 1 / np.sqrt(D_IN)
    head3 = stt.FactoredLinear(D_IN, 1000, bias=True)
    W = head3.dense_weight()
    assert W.abs().max() <= bound and W.abs().max() > 0.9 * bound and head3.dense_bias().abs().max() <= bound


# ---------------------------------------------------------------------- state
def test_state_dict_round_trip_resumes_bit_exactly():
    head = make_head(state_dtype=torch.float64, dtype=torch.float32, check_every=2)
    opt = stt.FactoredSGD(head, lr=0.4, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    rng = np.random.default_rng(6)
    for _ in range(3):
        train(head, opt, rng, steps=1)
        sched.step()
    buf = io.BytesIO()
    torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    twin = stt.FactoredLinear(D_IN, D, bias=True, dtype=torch.float32, state_dtype=torch.float64)
    twin.load_state_dict(saved["head"])
    twin_opt = stt.FactoredSGD(twin, lr=1.0)
    twin_opt.load_state_dict(saved["opt"])
    twin_sched = torch.optim.lr_scheduler.ExponentialLR(twin_opt, gamma=0.9)
    twin_sched.load_state_dict(saved["sched"])
    assert twin_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert twin._stabilization == head._stabilization
    seed = 77
    for h_, o_, s_ in ((head, opt, sched), (twin, twin_opt, twin_sched)):
        r = np.random.default_rng(seed)
        for _ in range(3):
            train(h_, o_, r, steps=1)
            s_.step()
    assert_state_equal(twin, state_snapshot(head))
    assert head.diagnostics()["steps"] == 6


def test_deepcopy_and_pickling_the_module():
    head = make_head()
    opt = stt.FactoredSGD(head, lr=0.3)
    train(head, opt, np.random.default_rng(11), steps=2)
    h = torch.randn(3, D_IN, dtype=torch.float64)
    opt.zero_grad()
    stt.linear_spherical_loss(h, head, torch.tensor([0, 1, 2])).backward()  # pending, not copied
    twin = copy.deepcopy(head)
    buf = io.BytesIO()
    torch.save(head, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        assert_state_equal(other, state_snapshot(head))
        assert other.pending_updates == 0 and other.V.data_ptr() != head.V.data_ptr()
        train(other, stt.FactoredSGD(other, lr=0.3), np.random.default_rng(12), steps=1)
    assert_state_equal(twin, state_snapshot(loaded))
    assert head.pending_updates == 1


def test_state_dict_shape_mismatch_is_refused():
    head = make_head()
    other = stt.FactoredLinear(D_IN, D + 1, bias=True, dtype=torch.float64)
    snap = state_snapshot(other)
    with pytest.raises(RuntimeError, match="nothing of it was loaded"):
        other.load_state_dict(head.state_dict())
    assert_state_equal(other, snap)  # U, Q, ... have matching shapes but were not loaded either


def test_factored_state_is_neither_parameters_nor_buffers_but_saved_moved_and_copied():
    # DistributedDataParallel broadcasts buffers and all-reduces parameters: the D x d state must be neither.
    model = nn.Sequential(nn.Linear(3, D_IN, dtype=torch.float64), make_head())
    assert [n for n, _ in model.named_buffers()] == []
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias"]
    keys = [k for k in model.state_dict() if k.startswith("1.")]
    assert keys == [f"1.{name}" for name in ("V", "U", "U_inv", "Q", "omega", "w_bar", "probe_max", "probe_min",
                                             "stats", "_extra_state")]
    head = model[1]
    W = head.dense_weight()
    model.float()
    assert head.V.dtype == torch.float32 and head.stats.dtype == torch.float64
    assert torch.equal(head.dense_weight(), W.float())


def trained_head(seed, **kwargs):
    head = make_head(seed=seed, **kwargs)
    train(head, stt.FactoredSGD(head, lr=0.3, weight_decay=0.01), np.random.default_rng(seed), steps=3)
    return head


@pytest.mark.parametrize("strict", [True, False])
def test_load_state_dict_is_all_or_nothing(strict):
    head, other = trained_head(1), trained_head(2)
    snap = state_snapshot(head)
    good = other.state_dict()
    for name in ("V", "Q", "stats"):
        partial = {k: v for k, v in good.items() if k != name}
        with pytest.raises(RuntimeError, match=rf"missing {name}\b.*nothing of it was loaded"):
            head.load_state_dict(partial, strict=strict)
        assert_state_equal(head, snap)
    no_config = {k: v for k, v in good.items() if k != "_extra_state"}
    with pytest.raises(RuntimeError, match="missing _extra_state.*nothing of it was loaded"):
        head.load_state_dict(no_config, strict=strict)
    assert_state_equal(head, snap)
    assert head.load_state_dict({**good, "unexpected": torch.zeros(1)}, strict=False).unexpected_keys == [
        "unexpected"]
    assert_state_equal(head, {k: v for k, v in good.items() if isinstance(v, torch.Tensor)})
    # prefixed, inside a model: the head raises before anything of it is copied
    model = nn.Sequential(trained_head(3))
    snap = state_snapshot(model[0])
    with pytest.raises(RuntimeError, match=r"missing 0\.U_inv"):
        model.load_state_dict({f"0.{k}": v for k, v in good.items() if k != "U_inv"}, strict=strict)
    assert_state_equal(model[0], snap)


def test_load_state_dict_checks_values_and_consistency():
    head, other = trained_head(1), trained_head(2)
    snap = state_snapshot(head)
    good = other.state_dict()
    cases = {
        "V": (good["V"].long(), "V has dtype torch.int64, expected a floating-point tensor"),
        "omega": (good["omega"].clone().fill_(float("nan")), "omega contains NaN or inf"),
        "U_inv": (head.state_dict()["U_inv"], r"U @ U_inv is not the identity"),  # from another state
        "Q": (head.state_dict()["Q"], r"Q is not W\^T W"),
        "w_bar": (head.state_dict()["w_bar"], r"w_bar is not W\^T 1"),
        "U": ("not a tensor", "U is a str, expected a tensor"),
    }
    for name, (value, message) in cases.items():
        with pytest.raises(RuntimeError, match=message + ".*nothing of it was loaded"):
            head.load_state_dict({**good, name: value})
        assert_state_equal(head, snap)
    bad_config = {**good, "_extra_state": {**good["_extra_state"], "stabilization": {"check_every": -1}}}
    with pytest.raises(RuntimeError, match="stabilization options are invalid: check_every"):
        head.load_state_dict(bad_config)
    assert_state_equal(head, snap)
    assert head._stabilization == other._stabilization
    # a consistent state of another dtype loads (converted), and training goes on exactly from it
    head.load_state_dict({k: v.float() if isinstance(v, torch.Tensor) and k != "stats" else v
                          for k, v in good.items()})
    assert max_rel(head.dense_weight(), other.dense_weight()) < 1e-6


def test_to_dtype_rebuilds_the_core():
    head = make_head(dtype=torch.float32)
    W32 = head.dense_weight()
    head.double()
    assert head.V.dtype == torch.float64 and head.U.dtype == torch.float64 and head.stats.dtype == torch.float64
    assert torch.equal(head.dense_weight(), W32.double())
    opt = stt.FactoredSGD(head, lr=0.1)
    train(head, opt, np.random.default_rng(7), steps=2)
    snap = state_snapshot(head)
    with pytest.raises(TypeError, match="float32 or float64"):
        head.half()
    assert_state_equal(head, snap)
    if not st.cuda_status()[0]:
        with pytest.raises(RuntimeError, match="cannot live on cuda"):
            check_device(torch.device("cuda"), "FactoredLinear")
    with pytest.raises(RuntimeError, match="supports CPU and CUDA"):
        stt.FactoredLinear(D_IN, D, device="meta")


# ---------------------------------------------------------------------- zero copy
def test_state_reaches_the_core_without_copies_and_is_updated_in_place():
    head = make_head(bias=False)
    engine = head._engine()
    for name, tensor in zip(st.layer.STATE_ARRAYS, head._state_tensors()):
        assert engine.arrays[name].ctypes.data == tensor.data_ptr(), name
    ptrs = [t.data_ptr() for t in head._state_tensors()]
    V0 = head.V.clone()
    opt = stt.FactoredSGD(head, lr=0.5)
    train(head, opt, np.random.default_rng(8), steps=1)
    assert [t.data_ptr() for t in head._state_tensors()] == ptrs
    assert not torch.equal(head.V, V0)  # V's target rows moved, in the tensor itself
    assert head._engine() is engine
    h = torch.randn(3, D_IN, dtype=torch.float64)
    H, owned = head._hidden(h)
    assert H.data_ptr() == h.data_ptr() and not owned
    H, owned = head._hidden(h[:, ::1].t().contiguous().t())  # non-contiguous: converted
    assert owned


# ---------------------------------------------------------------------- optimizer rules
def test_gradient_accumulation_equals_one_big_batch():
    rng = np.random.default_rng(9)
    h = torch.from_numpy(rng.standard_normal((10, D_IN)))
    y = torch_targets("class", 10, D, rng)
    heads = [make_head(), make_head()]
    opts = [stt.FactoredSGD(x, lr=0.3, weight_decay=0.1) for x in heads]
    stt.linear_spherical_loss(h, heads[0], y, reduction="sum").backward()
    for part in (slice(0, 3), slice(3, 10)):
        stt.linear_spherical_loss(h[part], heads[1], y[part], reduction="sum").backward()
    assert heads[1].pending_updates == 2
    for o in opts:
        o.step()
    assert max_rel(heads[1].dense_weight(), heads[0].dense_weight()) < 1e-13


def test_zero_grad_discards_and_stale_gradients_are_refused():
    head = make_head()
    opt = stt.FactoredSGD(head, lr=0.3)
    h = torch.randn(3, D_IN, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    stt.linear_spherical_loss(h, head, y).backward()
    opt.zero_grad()
    assert head.pending_updates == 0
    snap = state_snapshot(head)
    opt.step()  # nothing recorded: a no-op, like SGD with no gradients
    assert_state_equal(head, snap)
    stt.linear_spherical_loss(h, head, y).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="zero_grad"):
        opt.step()
    with pytest.raises(RuntimeError, match="zero_grad"):
        stt.linear_spherical_loss(h, head, y).backward()
    head.zero_grad()
    stt.linear_spherical_loss(h, head, y).backward()
    opt.step()


def test_backward_after_the_weights_changed_is_refused():
    head = make_head()
    opt = stt.FactoredSGD(head, lr=0.3)
    h = torch.randn(3, D_IN, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    loss_a = stt.linear_spherical_loss(h, head, y)
    loss_b = stt.linear_spherical_loss(h, head, y)
    loss_a.backward()
    opt.step()
    with pytest.raises(RuntimeError, match="between this forward pass and its backward"):
        loss_b.backward()


@pytest.mark.parametrize("fused", [True, False])
def test_input_gradients_alone_record_nothing(fused):
    """torch.autograd.grad(loss, x) and backward(inputs=[x]) leave every weight's gradient alone (an adversarial
    step, a gradient penalty): the head records nothing there, and its next step applies only the backward()'s
    gradient, as dense SGD applies only what reached weight.grad."""
    rng = np.random.default_rng(4)
    h = torch.from_numpy(rng.standard_normal((5, D_IN)))
    y = torch.tensor([1, 4, 4, 0, 7])
    heads = [make_head(), make_head()]
    opts = [stt.FactoredSGD(x, lr=0.3, weight_decay=0.1) for x in heads]

    def loss(head, x):
        if fused:
            return stt.linear_spherical_loss(x, head, y, reduction="sum")
        out = head(x, y)
        return (out.q / 2 - out.A).sum()

    x = h.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(heads[0], x), x)
    loss(heads[0], x).backward(inputs=[x])
    torch.autograd.grad(loss(heads[0], x), [x, heads[0].grad_anchor], allow_unused=True)  # returns, accumulates none
    assert heads[0].pending_updates == 0 and x.grad is not None
    loss(heads[0], (h + 0.1 * g.sign()).requires_grad_(True)).backward()
    loss(heads[1], (h + 0.1 * g.sign()).requires_grad_(True)).backward()
    for o in opts:
        o.step()
    assert torch.equal(heads[0].dense_weight(), heads[1].dense_weight())
    # listed among the inputs (e.g. a generator's parameters), the head records as a listed parameter accumulates
    opts[0].zero_grad()
    loss(heads[0], x).backward(inputs=[x, heads[0].grad_anchor])
    assert heads[0].pending_updates == 1


@pytest.mark.parametrize("fused", [True, False])
def test_second_backward_through_a_freed_graph_is_refused(fused):
    """As for any autograd graph: a second backward without retain_graph raises instead of recording the update
    twice; with retain_graph=True it records it twice, as dense SGD accumulates the gradient twice."""
    head = make_head()
    x = torch.randn(3, D_IN, dtype=torch.float64)  # a leaf that needs no gradient: nothing else in the graph
    y = torch.tensor([0, 1, 2])

    def loss():
        if fused:
            return stt.linear_spherical_loss(x, head, y)
        out = head(x, y)
        return out.q.sum() - out.A.sum()

    opt = stt.FactoredSGD(head, lr=0.3)  # kept: a head that no optimizer trains warns
    L = loss()
    L.backward()
    with pytest.raises(RuntimeError, match="second time"):
        L.backward()
    assert head.pending_updates == 1
    L = loss()
    L.backward(retain_graph=True)
    L.backward()
    assert head.pending_updates == 3
    opt.zero_grad()


def test_refresh_or_stabilize_between_backward_and_step_keep_the_gradients(device):
    """refresh() and stabilize() leave W as it is: gradients recorded before them are applied by the next step,
    which recomputes what they kept of the old factorisation (with one more recorded after the refresh)."""
    rng = np.random.default_rng(5)
    heads = [make_head(check_every=1000, refresh_every=0, device=device) for _ in range(3)]
    opts = [stt.FactoredSGD(x, lr=0.5, weight_decay=0.1) for x in heads]
    batches = [(torch.from_numpy(rng.standard_normal((6, D_IN))).to(device), torch.tensor([3, 3, 8, 0, 11, 2],
                device=device)) for _ in range(6)]
    for h, y in batches[:4]:  # the same steps for all three: U moves away from I
        for head, opt in zip(heads, opts):
            opt.zero_grad()
            stt.linear_spherical_loss(h, head, y).backward()
            opt.step()
    for head, opt in zip(heads, opts):
        opt.zero_grad()
        stt.linear_spherical_loss(batches[4][0], head, batches[4][1]).backward()
    heads[1].refresh()
    w_before = heads[2].dense_weight()
    heads[2].set_stabilization(sigma_range=(0.9999, 1.0001))
    assert heads[2].stabilize()["values_corrected"] > 0  # U and V change, W does not
    assert max_rel(heads[2].dense_weight(), w_before) < 1e-12
    for head in heads:  # one more backward after the change: kept and new updates in one step
        stt.linear_spherical_loss(batches[5][0], head, batches[5][1]).backward()
    for opt in opts:
        opt.step()
    ref = heads[0].dense_weight()
    for head in heads[1:]:
        assert max_rel(head.dense_weight(), ref) < 1e-12


def test_weights_replaced_between_backward_and_step_void_the_gradients():
    """load_state_dict or a dtype move between backward() and step(): the recorded gradients are in terms of the
    old weights, which dense SGD would still apply to the new ones; the head refuses until zero_grad()."""
    head, other = make_head(), make_head(seed=1)
    opt = stt.FactoredSGD(head, lr=0.3)
    h = torch.randn(3, D_IN, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    stt.linear_spherical_loss(h, head, y).backward()
    head.load_state_dict(other.state_dict())
    snap = state_snapshot(head)
    with pytest.raises(RuntimeError, match="load_state_dict replaced the weights.*zero_grad"):
        opt.step()
    with pytest.raises(RuntimeError, match="load_state_dict replaced the weights"):
        stt.linear_spherical_loss(h, head, y).backward()
    assert_state_equal(head, snap)
    opt.zero_grad()
    stt.linear_spherical_loss(h, head, y).backward()
    opt.step()
    opt.zero_grad()
    head.load_state_dict(other.state_dict())  # nothing recorded: nothing to refuse
    stt.linear_spherical_loss(h, head, y).backward()
    head.float()
    first = make_head(seed=2)
    opt = stt.FactoredSGD([first, head], lr=0.3)
    stt.linear_spherical_loss(h, first, y).backward()
    snap = state_snapshot(first)
    with pytest.raises(RuntimeError, match="a device or dtype move replaced the weights"):
        opt.step()
    assert_state_equal(first, snap)  # checked before any head stepped


def test_a_refused_group_leaves_every_head_unchanged():
    heads = [make_head(), make_head(seed=1)]
    opt = stt.FactoredSGD([{"params": heads[0]}, {"params": heads[1], "weight_decay": 10.0}], lr=0.3)
    h = torch.randn(3, D_IN, dtype=torch.float64)
    for head in heads:
        stt.linear_spherical_loss(h, head, torch.tensor([0, 1, 2])).backward()
    snaps = [state_snapshot(head) for head in heads]
    with pytest.raises(ValueError, match="lr \\* weight_decay"):
        opt.step()
    for head, snap in zip(heads, snaps):
        assert_state_equal(head, snap)
    opt.param_groups[1]["weight_decay"] = 0.1
    opt.step()  # the retry applies both
    assert not torch.equal(heads[0].V, snaps[0]["V"]) and not torch.equal(heads[1].V, snaps[1]["V"])


def test_stabilization_options_are_saved_as_python_numbers():
    head = make_head(check_every=np.int64(10), sigma_range=(np.float32(0.25), 4), inverse_tol=np.float64(1e-3))
    saved = head.get_extra_state()["stabilization"]
    assert saved == {"check_every": 10, "sigma_range": (0.25, 4.0), "inverse_tol": 1e-3}
    assert all(type(v) in (int, float, tuple) for v in saved.values())
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    make_head().load_state_dict(torch.load(buffer, weights_only=True))
    for bad in (2.0, "4", True):
        with pytest.raises(TypeError, match="in_features"):
            stt.FactoredLinear(bad, 3)


def test_param_groups_and_unsupported_options():
    a, b = make_head(seed=1), make_head(seed=2)
    opt = stt.FactoredSGD([{"params": a}, {"params": [b], "lr": 0.01}], lr=0.5, weight_decay=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.01] and opt.heads() == [a, b]
    for bad, match in (({"momentum": 0.9}, "momentum"), ({"nesterov": True}, "Nesterov"),
                       ({"betas": (0.9, 0.99)}, "Adam")):
        with pytest.raises(ValueError, match=match):
            stt.FactoredSGD(a, lr=0.1, **bad)
    with pytest.raises(TypeError, match="unexpected"):
        stt.FactoredSGD(a, lr=0.1, foo=1)
    with pytest.raises(TypeError, match=r"tensor.*weights are not parameters.*FactoredSGD\(model"):
        stt.FactoredSGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(TypeError, match="FactoredLinear heads only"):
        stt.FactoredSGD(["head"], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        stt.FactoredSGD(a, lr=-1)
    head = make_head()
    opt = stt.FactoredSGD(head, lr=0.1)
    head.float()
    with pytest.raises(RuntimeError, match="create the optimizer after moving"):
        opt.step()


class _Model(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(D_IN, D_IN, dtype=torch.float64)
        self.head = make_head(seed=seed)


def test_optimizer_takes_what_users_pass_or_says_what_to_pass():
    """FactoredSGD(model) trains the heads in a module; the common mistakes (head.parameters(), model.parameters(),
    a module without heads) raise with the fix instead of torch's "optimizer got an empty parameter list"."""
    model, reference = _Model(), make_head(seed=0)
    opt, opt_ref = stt.FactoredSGD(model, lr=0.3), stt.FactoredSGD(reference, lr=0.3)
    assert opt.heads() == [model.head]
    train(model.head, opt, np.random.default_rng(1), 3)
    train(reference, opt_ref, np.random.default_rng(1), 3)
    assert torch.equal(model.head.dense_weight(), reference.dense_weight())
    assert not torch.equal(model.head.dense_weight(), make_head(seed=0).dense_weight())
    # a generator of heads and modules, one head reached twice, and groups of modules
    two = stt.FactoredSGD((m for m in [model, model.head, reference]), lr=0.1)
    assert two.heads() == [model.head, reference]
    grouped = stt.FactoredSGD([{"params": model, "lr": 0.01}], lr=0.1)
    assert grouped.heads() == [model.head] and grouped.param_groups[0]["lr"] == 0.01
    head = make_head()
    assert list(head.parameters()) == []
    for bad in (head.parameters(), [], iter(())):
        with pytest.raises(ValueError, match=r"empty parameter list.*not as nn.Parameters.*FactoredSGD\(head, lr="):
            stt.FactoredSGD(bad, lr=0.1)
    with pytest.raises(TypeError, match=r"weights are not parameters.*FactoredSGD\(model, lr=...\)"):
        stt.FactoredSGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="contains no FactoredLinear"):
        stt.FactoredSGD(nn.Sequential(nn.Linear(2, 2)), lr=0.1)
    with pytest.raises(ValueError, match="no FactoredLinear head.*FactoredSGD\\(head"):
        stt.FactoredSGD([{"params": []}], lr=0.1)


def test_unowned_head_warns_once_and_frozen_head_is_silent():
    head = make_head()
    h = torch.randn(3, D_IN, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    with pytest.warns(RuntimeWarning, match="no FactoredSGD"):
        stt.linear_spherical_loss(h, head, y).backward()
    assert head.pending_updates == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stt.linear_spherical_loss(h, head, y).backward()  # warned once already
        frozen = make_head().requires_grad_(False)
        stt.linear_spherical_loss(h, frozen, y).backward()
    assert h.grad is not None


# ---------------------------------------------------------------------- bad input
def test_bad_input_raises_and_keeps_state():
    head = make_head()
    opt = stt.FactoredSGD(head, lr=0.3)
    train(head, opt, np.random.default_rng(10), steps=2)
    snap = state_snapshot(head)
    policy = dict(head._stabilization)
    h = torch.randn(4, D_IN, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    cases = [
        (lambda: head(h, y.float()), TypeError, "target must hold integer"),
        (lambda: head(h, torch.tensor([0, 1, 2, D])), ValueError, "target contains class"),
        (lambda: head(h, y[:3]), ValueError, "target has shape"),
        (lambda: head(h[:, :3], y), ValueError, "input has shape"),
        (lambda: head(h.long(), y), TypeError, "input must be floating"),
        (lambda: head(torch.full_like(h, float("nan")), y), ValueError, "NaN"),
        (lambda: head(h, "abc"), TypeError, "target must be a tensor"),
        (lambda: head(h, (torch.tensor([0, 1, 1, 2, 2]), torch.tensor([0, D + 3]), torch.ones(2))), ValueError,
         "out of range"),
        (lambda: head(h, (torch.tensor([0, 1, 1, 2, 2]), torch.tensor([0, 1]), torch.tensor([1.0, float("inf")]))),
         ValueError, "NaN or inf"),
        (lambda: head(h, y, ignore_index=1.5), TypeError, "ignore_index"),
        (lambda: head(h, y, ignore_index=True), TypeError, "ignore_index"),
        (lambda: stt.linear_spherical_loss(h, head, y, ignore_index=True), TypeError, "ignore_index"),
        (lambda: stt.LinearSphericalLoss(ignore_index=False), TypeError, "ignore_index"),
        (lambda: stt.linear_spherical_loss(h, head, y, loss="softmax"), ValueError, "loss must be one of"),
        (lambda: stt.linear_spherical_loss(h, head, y, eps=0.1, loss="taylor_softmax"), TypeError, "options"),
        (lambda: stt.linear_spherical_loss(h, head, y, reduction="avg"), ValueError, "reduction"),
        (lambda: stt.LinearSphericalLoss(reduction="avg"), ValueError, "reduction"),
        (lambda: head.set_stabilization(sigma_range=(2, 3)), ValueError, "sigma_range"),
        (lambda: head.set_stabilization(check_every=5, inverse_tol=-1), ValueError, "inverse_tol"),
        (lambda: head.set_stabilization(tol=1), TypeError, "unknown stabilization"),
        (lambda: stt.FactoredLinear(D_IN, D, dtype=torch.float16), TypeError, "float32 or float64"),
        (lambda: stt.FactoredLinear(D_IN, D, weight=torch.zeros(D, D_IN + 1)), ValueError, "weight has shape"),
        (lambda: stt.FactoredLinear(0, D), ValueError, "in_features"),
        (lambda: stt.FactoredLinear(D_IN, D, initial_bias=torch.zeros(D)), ValueError, "needs bias=True"),
        (lambda: stt.FactoredLinear(D_IN, D, bias=True, initial_bias=torch.zeros(D + 1)), ValueError,
         "initial_bias has shape"),
        (lambda: stt.FactoredLinear(D_IN, D, weight=torch.full((D, D_IN), float("inf"))), ValueError, "NaN or inf"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
        assert_state_equal(head, snap)
    assert head._stabilization == policy  # a refused set_stabilization changed nothing, also in the core
    assert head._engine().core.check_every == 16 and head._engine().core.inverse_tol == 1e-3


def test_singular_update_is_refused_at_step_and_keeps_state_and_gradients():
    head = make_head()  # with the bias, the core sees h' = [h, 1]
    h = torch.randn(1, D_IN, dtype=torch.float64)
    # squared error: M = I - 2 lr h' h'^T, singular for lr = 1 / (2 ||h'||^2)
    opt = stt.FactoredSGD(head, lr=float(1 / (2 * (h.square().sum() + 1))))
    stt.linear_spherical_loss(h, head, torch.tensor([3]), loss="squared_error", reduction="sum").backward()
    snap = state_snapshot(head)
    with pytest.raises(st.SingularUpdateError, match="lower lr"):
        opt.step()
    assert_state_equal(head, snap)
    assert head.pending_updates == 1
    opt.param_groups[0]["lr"] = 1e-3
    opt.step()
    assert head.pending_updates == 0
    with pytest.raises(ValueError, match="lr \\* weight_decay"):
        stt.FactoredSGD(head, lr=2.0, weight_decay=0.6).step()


def test_loss_module_and_repr():
    head = make_head()
    crit = stt.LinearSphericalLoss("z_loss", a=0.5, reduction="sum")
    h = torch.randn(4, D_IN, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, -100])
    with torch.no_grad():
        ref = stt.linear_spherical_loss(h, head, y, loss="z_loss", a=0.5, reduction="sum")
        assert torch.equal(crit(h, head, y), ref)
    assert "z_loss" in repr(crit) and "in_features=5" in repr(head)


def test_loss_module_deep_copies_and_pickles():
    """The loss module holds its checked options; copies and pickles of it (and of models holding it) compute the
    same loss."""
    crit = stt.LinearSphericalLoss("z_loss", a=0.5, reduction="sum")
    head = make_head()
    h, y = torch.randn(4, D_IN, dtype=torch.float64), torch.tensor([0, 1, 2, -100])
    with torch.no_grad():
        ref = crit(h, head, y)
        buf = io.BytesIO()
        torch.save(crit, buf)
        buf.seek(0)
        for other in (copy.deepcopy(crit), torch.load(buf, weights_only=False)):
            assert torch.equal(other(h, head, y), ref)
    crit.reduction = "avg"  # set after construction: still refused by name
    with pytest.raises(ValueError, match="reduction"):
        crit(h, head, y)


@pytest.mark.parametrize("how", ["forward_hook", "pre_hook", "subclass"])
def test_loss_of_a_head_with_hooks_or_its_own_forward_goes_through_the_call(how):
    """The fused loss skips the module call; a head with hooks or an overridden forward takes the torch expression
    on head(...), so that they run, with the same loss and gradients."""
    calls = []

    class Traced(stt.FactoredLinear):
        def forward(self, input, target, *, ignore_index=-100):
            calls.append("forward")
            return super().forward(input, target, ignore_index=ignore_index)

    torch.manual_seed(0)
    head = (Traced if how == "subclass" else stt.FactoredLinear)(D_IN, D, dtype=torch.float64)
    plain = copy.deepcopy(head) if how != "subclass" else stt.FactoredLinear(D_IN, D, dtype=torch.float64,
                                                                                 weight=head.dense_weight())
    if how == "forward_hook":
        head.register_forward_hook(lambda *args: calls.append("hook"))
    elif how == "pre_hook":
        head.register_forward_pre_hook(lambda *args: calls.append("hook"))
    y = torch.tensor([3, -100, 7, 7])
    losses, grads = [], []
    for module in (head, plain):
        opt = stt.FactoredSGD(module, lr=0.5)
        h = torch.randn(4, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        L = stt.linear_spherical_loss(h, module, y, loss="taylor_softmax")
        fused = type(L.grad_fn).__name__ == "FactoredLossFunctionBackward"
        assert fused == (module is plain)
        L.backward()
        opt.step()
        losses.append(L.detach())
        grads.append(h.grad)
    assert calls == ["forward" if how == "subclass" else "hook"]
    assert max_rel(losses[0], losses[1]) < 1e-12 and max_rel(grads[0], grads[1]) < 1e-12
    assert max_rel(head.dense_weight(), plain.dense_weight()) < 1e-12


@pytest.mark.parametrize("kind", ["class", "csr"])
def test_targets_changed_in_place_after_backward_do_not_reach_the_step(kind):
    """The pending update keeps targets of its own: changing the caller's target tensors between backward() and
    step() (e.g. a reused batch buffer) changes nothing."""
    rng = np.random.default_rng(5)
    heads = [make_head(seed=1), make_head(seed=1)]
    opts = [stt.FactoredSGD(head, lr=0.5) for head in heads]
    h = torch.from_numpy(rng.standard_normal((4, D_IN)))
    target = torch_targets(kind, 4, D, rng, form="tuple")
    for head, opt, scribble in zip(heads, opts, (False, True)):
        given = target.clone() if kind == "class" else tuple(t.clone() for t in target)
        stt.linear_spherical_loss(h, head, given).backward()
        if scribble:
            for t in (given,) if kind == "class" else given:
                t.fill_(1)
        opt.step()
    assert torch.equal(heads[0].dense_weight(), heads[1].dense_weight())
    assert max_rel(heads[0].dense_weight(), make_head(seed=1).dense_weight()) > 1e-4


@pytest.mark.parametrize("fused", [True, False])
def test_input_changed_in_place_after_backward_does_not_reach_the_step(fused):
    """The pending update keeps H of its own where H is the input's memory (no bias column, the state dtype): the
    fused forward has the core copy it, the other path clones it. Changing the input between backward() and
    step() changes nothing."""
    rng = np.random.default_rng(6)
    heads = [make_head(bias=False, seed=1), make_head(bias=False, seed=1)]
    opts = [stt.FactoredSGD(head, lr=0.5) for head in heads]
    h0 = torch.from_numpy(rng.standard_normal((4, D_IN)))
    y = torch.tensor([1, 2, -100, 4])
    for head, opt, scribble in zip(heads, opts, (False, True)):
        h = h0.clone()
        L = (stt.linear_spherical_loss(h, head, y) if fused
             else stt.spherical_softmax_loss(head(h, y)))
        assert (type(L.grad_fn).__name__ == "FactoredLossFunctionBackward") == fused
        L.backward()
        if scribble:
            h.fill_(3.0)
        opt.step()
    assert torch.equal(heads[0].dense_weight(), heads[1].dense_weight())
    assert max_rel(heads[0].dense_weight(), make_head(bias=False, seed=1).dense_weight()) > 1e-4


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
def test_plain_call_builds_what_the_general_checks_build(bias, state_dtype):
    """``_plain_call`` (a 2-D floating CPU input with int64 labels) gives the HeadCall of ``_call``: the same H (the
    input itself where it is already H, else the same converted copy), ownership, targets and engine; for every other
    form it declines."""
    head = make_head(bias=bias, dtype=state_dtype)
    engine = head._engine()
    rng = np.random.default_rng(3)
    y = torch.tensor([4, -100, 0, D - 1, 4, 9, 2])
    base = torch.from_numpy(rng.standard_normal((7, D_IN)))
    strided, broadcast = base.t().contiguous().t(), base[:, :1].expand(7, D_IN)
    for x in (base, base.float(), base.half(), base.to(torch.bfloat16), strided, broadcast):
        for ignore_index in (-100, 4):
            labels = y.clone()
            labels[1] = ignore_index
            plain = head._plain_call(x, labels, ignore_index, engine)
            h, general = head._call(x, labels, ignore_index, engine)
            assert plain is not None and h is x
            assert plain.engine is general.engine and plain.owned == general.owned
            assert plain.H.dtype == general.H.dtype == state_dtype and torch.equal(plain.H, general.H)
            assert plain.H.is_contiguous() and (plain.H.data_ptr() == x.data_ptr()) == (not plain.owned)
            pt, gt = plain.target, general.target
            counted = 7 - int((labels == ignore_index).sum())  # 6 with -100, 4 with 4
            assert (pt.shape, pt.out_features, pt.entries, pt.rows_counted) == (gt.shape, gt.out_features, gt.entries,
                                                                               gt.rows_counted) == (
                (7,), D, 7, counted)
            for name in ("indptr", "indices", "values", "active"):
                a, b = getattr(pt.csr, name), getattr(gt.csr, name)
                assert (a is None and b is None) or np.array_equal(a, b), name
    declined = ((base.reshape(7, 1, D_IN), y.reshape(7, 1)), (base, y.to(torch.int32)), (base, y.reshape(7, 1)),
                (nn.Parameter(base.clone()), y), (base[:0], y[:0]), (base, torch.stack([y, y], 1)[:, 0]))
    for x, labels in declined:
        assert head._plain_call(x, labels, -100, engine) is None


def test_shared_memory_head_trains_alike():
    """``share_memory()`` moves the state into shared memory (V is NumPy's memory before that); the head then
    trains exactly as an unshared copy."""
    heads = [make_head(seed=5), make_head(seed=5)]
    heads[1].share_memory()
    assert heads[1].V.is_shared() and not heads[0].V.is_shared()
    h = torch.from_numpy(np.random.default_rng(1).standard_normal((5, D_IN)))
    y = torch.tensor([1, 3, 3, -100, D - 2])
    for head in heads:
        opt = stt.FactoredSGD(head, lr=0.3, weight_decay=0.01)
        for _ in range(3):
            opt.zero_grad()
            stt.linear_spherical_loss(h, head, y).backward()
            opt.step()
    assert torch.equal(heads[0].dense_weight(), heads[1].dense_weight())
    assert max_rel(heads[0].dense_weight(), make_head(seed=5).dense_weight()) > 1e-4


@pytest.mark.parametrize("form", ["int32", "strided", "2-D", "strided input"])
def test_class_labels_in_any_layout_train_alike(form, monkeypatch):
    """Class labels that take the general conversion (another integer dtype, a strided view), a 2-D input with
    2-D labels give the same losses, input gradients and step as int64 labels (m,) of a 2-D input, which take the
    shorter checks of ``_plain_call`` (a strided input too; the other forms take the general ones)."""
    rng = np.random.default_rng(7)
    heads = [make_head(seed=2), make_head(seed=2)]
    opts = [stt.FactoredSGD(head, lr=0.5, weight_decay=0.1) for head in heads]
    h0 = torch.from_numpy(rng.standard_normal((6, D_IN)))
    y = torch.tensor([3, -100, 7, 7, D - 1, 0])
    given = {"int32": y.to(torch.int32), "strided": torch.stack([y, y], 1)[:, 1], "2-D": y.reshape(2, 3),
             "strided input": y}[form]
    assert form != "strided" or not given.is_contiguous()
    general_calls = []
    general = stt.FactoredLinear._call
    monkeypatch.setattr(stt.FactoredLinear, "_call", lambda self, *a: general_calls.append(1) or general(self, *a))
    results = []
    for i, (head, opt, labels) in enumerate(zip(heads, opts, (y, given))):
        h = h0 if labels.dim() == 1 else h0.reshape(2, 3, D_IN)
        if i == 1 and form == "strided input":
            h = h.t().contiguous().t()
            assert not h.is_contiguous()
        h = h.clone().requires_grad_(True)
        L = stt.linear_spherical_loss(h, head, labels, reduction="none")
        assert len(general_calls) == (i if form != "strided input" else 0)
        L.sum().backward()
        opt.step()
        results.append((L.detach().reshape(-1), h.grad.reshape(6, D_IN)))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert torch.equal(heads[0].dense_weight(), heads[1].dense_weight())
    assert max_rel(heads[0].dense_weight(), make_head(seed=2).dense_weight()) > 1e-4


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_non_finite_upstream_gradient_raises_and_ignored_rows_ignore_it(reduction):
    """A NaN or inf gradient flowing into the loss raises ValueError in both paths (nothing is recorded); with
    'none', an inf on an ignored row changes nothing (as through the torch expression's torch.where)."""
    head = make_head()
    opt = stt.FactoredSGD(head, lr=0.1)
    y = torch.tensor([1, -100, 4])
    h = torch.randn(3, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bad = torch.tensor([1.0, 1.0, torch.inf] if reduction == "none" else torch.inf, dtype=torch.float64)
    for L in (stt.linear_spherical_loss(h.clone().requires_grad_(True), head, y, eps=0.01, reduction=reduction),
              stt.spherical_softmax_loss(head(h.clone().requires_grad_(True), y), eps=0.01, reduction=reduction)):
        with pytest.raises(ValueError, match="NaN or inf"):
            L.backward(bad)
    assert head.pending_updates == 0
    if reduction == "none":
        upstream = torch.tensor([0.5, torch.inf, 2.0], dtype=torch.float64)
        grads = []
        for fused in (True, False):
            h_ = h.clone().requires_grad_(True)
            L = (stt.linear_spherical_loss(h_, head, y, eps=0.01, reduction="none") if fused
                 else stt.spherical_softmax_loss(head(h_, y), eps=0.01, reduction="none"))
            L.backward(upstream)
            grads.append(h_.grad)
        assert torch.equal(grads[0][1], torch.zeros(D_IN, dtype=torch.float64))
        assert max_rel(grads[0], grads[1]) < 1e-12
    opt.zero_grad()
