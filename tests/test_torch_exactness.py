"""The torch front end against nn.Linear + the dense loss + torch.optim.SGD, in float64: losses, the body's
gradients and every weight after several steps, with a small body network trained by Adam in both runs."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import sparsetarget.torch as stt  # noqa: E402
from reference import LOSSES  # noqa: E402
from sparsetarget.torch.functional import LOSSES as TORCH_LOSSES  # noqa: E402
from torch import nn  # noqa: E402
from torch_reference import dense_loss, max_rel, to_device, torch_targets  # noqa: E402

D, D_IN, X_DIM = 37, 6, 5
BATCHES = (1, 9, 4)  # m = 1, m > d and m < d (d = D_IN or D_IN + 1 with the bias)
TOL = 1e-9


def make_pair(bias: bool, seed: int = 0, device: str = "cpu"):
    """The same body + head twice: dense (nn.Linear, on the CPU) and factored (FactoredLinear from it, with its
    body, on ``device``)."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(X_DIM, D_IN, dtype=torch.float64), nn.Tanh())
    linear = nn.Linear(D_IN, D, bias=bias, dtype=torch.float64)
    head = stt.FactoredLinear.from_linear(linear, device=device)
    return (body, linear), (copy.deepcopy(body).to(device), head)


def compare_training(loss, reduction, kind, bias, weight_decay, accumulate, custom=None, steps=3, lr=0.3,
                     schedule=True, seed=0, device="cpu", batches=BATCHES, written_in_torch=False):
    """Train both for ``steps`` steps of ``accumulate`` micro-batches; return the worst relative errors. The
    factored loss is ``linear_spherical_loss`` (on the CPU one autograd node, evaluated by the core), or with
    ``written_in_torch`` the torch function of ``loss`` on the head's (A, q, s)."""
    (body_d, linear), (body_f, head) = make_pair(bias, seed, device)
    opts = LOSSES[loss]
    opt_bd = torch.optim.Adam(body_d.parameters(), lr=0.01)
    opt_bf = torch.optim.Adam(body_f.parameters(), lr=0.01)
    opt_hd = torch.optim.SGD(linear.parameters(), lr=lr, weight_decay=weight_decay)
    opt_hf = stt.FactoredSGD(head, lr=lr, weight_decay=weight_decay)
    scheds = []
    if schedule:
        scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt_hd, opt_hf)]
    rng = np.random.default_rng(seed + 1)
    errs = {"loss": 0.0, "body_grad": 0.0, "weights": 0.0}
    for step in range(steps):
        for opt in (opt_bd, opt_bf, opt_hd, opt_hf):
            opt.zero_grad()
        for micro in range(accumulate):
            m = batches[(step + micro) % len(batches)]
            x = torch.from_numpy(rng.standard_normal((m, X_DIM)))
            target = torch_targets(kind, m, D, rng, form="tuple" if micro % 2 else "sparse")
            upstream = torch.from_numpy(rng.uniform(0.5, 2.0, m))
            o = linear(body_d(x))
            x_f, target_f = x.to(device), to_device(target, device)
            if custom is None:
                L_d = dense_loss(o, target, loss, opts, reduction)
                if written_in_torch:
                    L_f = TORCH_LOSSES[loss](head(body_f(x_f), target_f), reduction=reduction, **opts)
                else:
                    L_f = stt.linear_spherical_loss(body_f(x_f), head, target_f, loss=loss, reduction=reduction,
                                                    **opts)
                fused = type(L_f.grad_fn).__name__ == "FactoredLossFunctionBackward"
                assert fused == (device == "cpu" and not written_in_torch), L_f.grad_fn
            else:
                A_d = o.gather(1, target[:, None])[:, 0]
                L_d = custom(A_d, (o * o).sum(1), o.sum(1))
                out = head(body_f(x_f), target_f)
                L_f = custom(out.A, out.q, out.s)
            errs["loss"] = max(errs["loss"], max_rel(L_f, L_d))
            if reduction == "none":
                L_d.backward(upstream)
                L_f.backward(upstream.to(device))
            else:
                L_d.backward()
                L_f.backward()
        for p_d, p_f in zip(body_d.parameters(), body_f.parameters()):
            errs["body_grad"] = max(errs["body_grad"], max_rel(p_f.grad, p_d.grad))
        for opt in (opt_bd, opt_bf, opt_hd, opt_hf):
            opt.step()
        for s in scheds:
            s.step()
    errs["weights"] = max_rel(head.dense_weight(), linear.weight)
    if bias:
        errs["weights"] = max(errs["weights"], max_rel(head.dense_bias(), linear.bias))
    for p_d, p_f in zip(body_d.parameters(), body_f.parameters()):
        errs["weights"] = max(errs["weights"], max_rel(p_f, p_d))
    # the weights moved for real: a test that cannot fail is no test
    assert max_rel(head.dense_weight(), make_pair(bias, seed)[0][1].weight) > 1e-4
    return errs


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("bias,weight_decay", [(False, 0.0), (True, 0.0), (False, 0.1), (True, 0.1)])
@pytest.mark.parametrize("kind", ["class", "class_ignore", "csr"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_training_matches_dense(loss, reduction, kind, bias, weight_decay, accumulate, device):
    errs = compare_training(loss, reduction, kind, bias, weight_decay, accumulate, device=device)
    assert max(errs.values()) < TOL, errs


@pytest.mark.parametrize("kind", ["class_ignore", "csr"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_losses_written_in_torch_match_dense(loss, reduction, kind, device):
    """The torch functions of the built-in losses on (A, q, s), which linear_spherical_loss fuses into one node
    on the CPU, train exactly too."""
    errs = compare_training(loss, reduction, kind, True, 0.1, 2, device=device, written_in_torch=True)
    assert max(errs.values()) < TOL, errs


@pytest.mark.parametrize("bias", [False, True])
def test_custom_loss_expression(bias, device):
    """Any torch expression of (A, q, s) trains exactly, e.g. a hinge on A against the output norm plus a
    penalty on sum(o)."""

    def custom(A, q, s):
        return (torch.relu(1.0 - A / torch.sqrt(q + 1.0)) ** 2).sum() + 0.01 * (s * s).mean() + 0.1 * q.mean()

    errs = compare_training("squared_error", "sum", "class", bias, 0.05, 2, custom=custom, device=device)
    assert max(errs.values()) < TOL, errs


def test_many_steps_float64_and_monitoring(device):
    """40 steps with the bias and weight decay: still exact, and the stabiliser ran every step."""
    errs = compare_training("spherical_softmax", "mean", "csr", True, 0.01, 1, steps=40, lr=0.5, schedule=False,
                            device=device)
    assert max(errs.values()) < 1e-8, errs


def test_float32_against_dense_float32(device):
    """float32 head vs dense float32: the difference stays at the float32 rounding level of the dense run."""
    torch.manual_seed(3)
    linear = nn.Linear(D_IN, D, bias=True)
    head = stt.FactoredLinear.from_linear(linear, device=device)
    ref64 = nn.Linear(D_IN, D, bias=True, dtype=torch.float64)
    ref64.load_state_dict({k: v.double() for k, v in linear.state_dict().items()})
    opts = [torch.optim.SGD(linear.parameters(), lr=0.2), stt.FactoredSGD(head, lr=0.2),
            torch.optim.SGD(ref64.parameters(), lr=0.2)]
    rng = np.random.default_rng(0)
    for _ in range(10):
        h = torch.from_numpy(rng.standard_normal((8, D_IN)))
        y = torch_targets("class", 8, D, rng)
        for o in opts:
            o.zero_grad()
        dense_loss(linear(h.float()), y, "taylor_softmax", {}, "mean").backward()
        dense_loss(ref64(h), y, "taylor_softmax", {}, "mean").backward()
        stt.linear_spherical_loss(h.float().to(device), head, y.to(device), loss="taylor_softmax").backward()
        for o in opts:
            o.step()
    dense_err = max_rel(linear.weight, ref64.weight)
    factored_err = max_rel(head.dense_weight(), ref64.weight)
    assert factored_err < 10 * dense_err + 1e-6, (factored_err, dense_err)


@pytest.mark.parametrize("kind", ["class_ignore", "csr"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_large_minibatches_match_dense(loss, kind, device):
    """m >= 2d: the step forms its Q update without the m x m Gram matrix; the torch path hands it grad_H."""
    errs = compare_training(loss, "sum", kind, True, 0.1, 1, lr=0.05, batches=(30, 17, 41), device=device)
    assert max(errs.values()) < 1e-10, errs
