"""Property-based tests (hypothesis) of both front ends against the dense float64 reference: random shapes, dtypes,
memory layouts, targets (class labels with ignored rows, multi-label CSR with duplicates) and scalars; and every
raise leaves the state bit-identical.

The number of examples comes from a settings profile: ``ci`` (the default, small enough for CI) or ``long``
(``SPARSETARGET_HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py``, for local runs).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
import sparsetarget as st  # noqa: E402
from conftest import CSR  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402
from reference import LOSSES, DenseSGD, dense_targets, rel_err  # noqa: E402

# no example database: nothing is written into the source tree (a failure prints its example)
settings.register_profile("ci", max_examples=30, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=600, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("SPARSETARGET_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)

FLOATS = (np.float32, np.float64)


def tolerance(*dtypes) -> float:
    """Relative tolerance against the float64 reference: float64 rounding amplified by a few steps, or float32's."""
    return 1e-8 if all(np.dtype(t) == np.float64 for t in dtypes) else 2e-3


@hs.composite
def targets(draw, m: int, D: int, ignore_index: int = -100):
    """Class labels (some ignored, int32/int64/uint64 when none is) or a CSR matrix with duplicate indices."""
    kind = draw(hs.sampled_from(["class", "class_ignore", "csr"]))
    rng = np.random.default_rng(draw(hs.integers(0, 2**32 - 1)))
    if kind == "class":
        labels = rng.integers(0, D, m)
        return labels.astype(draw(hs.sampled_from([np.int64, np.int32, np.uint64])))
    if kind == "class_ignore":
        labels = rng.integers(0, D, m)
        labels[rng.random(m) < 0.4] = ignore_index
        return labels
    counts = rng.integers(0, 4, m)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    indices = rng.integers(0, D, indptr[-1])
    if indices.size >= 2:
        indices[1] = indices[0]  # a duplicate (within a row, or across two rows)
    return CSR(indptr, indices, rng.uniform(0.1, 2.0, indices.size), (m, D))


def hidden(draw, m: int, d: int, rng: np.random.Generator):
    """H in a random dtype and memory layout (C, Fortran order or a strided view)."""
    H = rng.standard_normal((m, d)) / np.sqrt(d)
    layout = draw(hs.sampled_from(["C", "F", "strided"]))
    dtype = draw(hs.sampled_from(FLOATS))
    if layout == "F":
        return np.asfortranarray(H.astype(dtype))
    if layout == "strided":
        wide = np.zeros((m, 2 * d), dtype=dtype)
        wide[:, ::2] = H
        return wide[:, ::2]
    return H.astype(dtype)


def close(a: np.ndarray, ref: np.ndarray, tol: float) -> bool:
    """max |a - ref| <= tol * max(max |ref|, 1)."""
    return float(np.abs(np.asarray(a, np.float64) - ref).max()) <= tol * max(float(np.abs(ref).max()), 1.0)


def snapshot(layer) -> dict[str, np.ndarray]:
    return {k: v for k, v in layer.state_dict().items() if k != "config"}


def assert_unchanged(layer, before) -> None:
    for k, v in snapshot(layer).items():
        assert np.array_equal(v, before[k]), k


# ---------------------------------------------------------------------------------------------------- NumPy
@given(data=hs.data())
def test_numpy_steps_match_the_dense_reference(data):
    D = data.draw(hs.integers(2, 40), "D")
    d = data.draw(hs.integers(1, 9), "d")
    dtype = data.draw(hs.sampled_from(FLOATS), "dtype")
    state_dtype = data.draw(hs.sampled_from(FLOATS), "state_dtype")
    loss = data.draw(hs.sampled_from(sorted(LOSSES)), "loss")
    if loss == "z_loss":  # with a handful of outputs the z-scores are degenerate (D = 2: always +-1)
        D = max(D, 8)
    lr = data.draw(hs.floats(0.0, 0.2), "lr")
    weight_decay = data.draw(hs.sampled_from([0.0, 1e-3, 0.1]), "weight_decay")
    seed = data.draw(hs.integers(0, 2**32 - 1), "seed")
    rng = np.random.default_rng(seed)
    layer = st.FactoredOutput.random(D, d, dtype=dtype, state_dtype=state_dtype, loss=loss, seed=seed,
                                     **LOSSES[loss])
    dense = DenseSGD(layer.dense_weight().astype(np.float64))
    tol = tolerance(dtype, state_dtype)
    for _ in range(data.draw(hs.integers(1, 3), "steps")):
        m = data.draw(hs.integers(1, 12), "m")
        H = hidden(data.draw, m, d, rng)
        y = data.draw(targets(m, D))
        Y, mask = dense_targets(y, m, D)
        # the z-loss takes the variance of the outputs from q and s: var = q/D - (s/D)^2 cancels, amplifying
        # rounding by mean(o^2) / var(o), which the tolerance must allow for (the dense run computes it directly)
        O = H.astype(np.float64) @ dense.W.T
        var = O.var(1)
        kappa = float(np.max((O * O).mean(1) / np.where(var > 0, var, np.inf))) if loss == "z_loss" else 1.0
        tol_step = tol * max(1.0, kappa)
        before = snapshot(layer)
        try:
            losses, grad_H = layer.step(H, y, lr, weight_decay)
        except ValueError as err:  # a refused step (z-loss without variance, a singular factor): nothing changed
            assert "unchanged" in str(err) or "variance" in str(err), err
            assert_unchanged(layer, before)
            continue
        L_ref, G_ref = dense.step(H.astype(np.float64), Y, loss, LOSSES[loss], lr, weight_decay, mask)
        assert losses.dtype == np.float64 and grad_H.dtype == H.dtype and grad_H.shape == (m, d)
        # relative to the reference, or to 1 where it cancels to ~0 (losses and grad_H are O(1) at these scales)
        assert close(losses, L_ref, tol_step)
        assert close(grad_H, G_ref, tolerance(dtype, state_dtype, H.dtype) * max(1.0, kappa))  # in H's dtype
        tol = tol_step  # the weights carry the error of every step so far
        assert rel_err(layer.dense_weight(), dense.W) < tol


BAD_INPUTS = ["nan_H", "inf_H", "H_shape", "H_int", "label_range", "label_uint64_wrap", "label_float", "csr_indptr",
              "csr_index", "csr_nan", "negative_lr", "lr_str", "lr_wd", "wd_nan", "huge_lr", "dA_shape", "dq_nan"]


@given(data=hs.data())
def test_numpy_every_raise_leaves_the_state_bit_identical(data):
    D = data.draw(hs.integers(2, 30), "D")
    d = data.draw(hs.integers(1, 7), "d")
    m = data.draw(hs.integers(1, 6), "m")
    dtype = data.draw(hs.sampled_from(FLOATS), "dtype")
    state_dtype = data.draw(hs.sampled_from(FLOATS), "state_dtype")
    bad = data.draw(hs.sampled_from(BAD_INPUTS), "bad")
    rng = np.random.default_rng(data.draw(hs.integers(0, 2**32 - 1), "seed"))
    layer = st.FactoredOutput.random(D, d, dtype=dtype, state_dtype=state_dtype, loss="spherical_softmax")
    with contextlib.suppress(st.SingularUpdateError):  # a state that is not the initial one
        layer.step(rng.standard_normal((m, d)) / np.sqrt(d), rng.integers(0, D, m), 0.05)
    H, y, lr, wd = rng.standard_normal((m, d)), rng.integers(0, D, m), 0.1, 0.0
    dA, dq, ds = np.ones(m), np.ones(m), np.zeros(m)
    backward = bad in ("dA_shape", "dq_nan")
    if bad == "nan_H":
        H[rng.integers(m), rng.integers(d)] = np.nan
    elif bad == "inf_H":
        H[0, 0] = -np.inf
    elif bad == "H_shape":
        H = rng.standard_normal((m, d + 1))
    elif bad == "H_int":
        H = np.ones((m, d), dtype=np.int64)
    elif bad == "label_range":
        y[-1] = D + data.draw(hs.integers(0, 10**6))
    elif bad == "label_uint64_wrap":
        y = y.astype(np.uint64)
        y[0] = np.uint64(2**64 - 100)  # would be -100 = ignore_index in int64
    elif bad == "label_float":
        y = y.astype(np.float64)
    elif bad == "csr_indptr":
        y = CSR([0] + [2] * (m - 1) + [1], [1, 2], [1.0, 1.0], (m, D)) if m > 1 else CSR([1, 2], [1, 2], [1, 1], (m, D))
    elif bad == "csr_index":
        y = CSR([0] * m + [1], [D], [1.0], (m, D))
    elif bad == "csr_nan":
        y = CSR([0] * m + [1], [0], [np.nan], (m, D))
    elif bad == "negative_lr":
        lr = -data.draw(hs.floats(1e-9, 10))
    elif bad == "lr_str":
        lr = "0.1"
    elif bad == "lr_wd":
        lr, wd = 2.0, 0.5
    elif bad == "wd_nan":
        wd = np.nan
    elif bad == "huge_lr":
        lr, H = 1e308, H * 1e10  # overflows in every dtype
    elif bad == "dA_shape":
        dA = np.ones(m + 1)
    elif bad == "dq_nan":
        dq[0] = np.nan
    before, cfg = snapshot(layer), layer.config()
    with pytest.raises((ValueError, TypeError)):
        if backward:
            layer.backward_step(H, y, dA, dq, ds, lr, wd)
        else:
            layer.step(H, y, lr, wd)
    assert_unchanged(layer, before)
    assert layer.config() == cfg


# ---------------------------------------------------------------------------------------------------- torch
@given(data=hs.data())
def test_torch_training_matches_nn_linear_and_sgd(data):
    torch = pytest.importorskip("torch")
    import sparsetarget.torch as stt
    from torch_reference import dense_loss as torch_dense_loss
    from torch_reference import max_rel, torch_targets

    D = data.draw(hs.integers(2, 30), "D")
    d = data.draw(hs.integers(1, 8), "d")
    bias = data.draw(hs.booleans(), "bias")
    loss = data.draw(hs.sampled_from(sorted(LOSSES)), "loss")
    if loss == "z_loss":
        D = max(D, 8)
    reduction = data.draw(hs.sampled_from(["mean", "sum"]), "reduction")
    lr = data.draw(hs.floats(0.0, 0.2), "lr")
    weight_decay = data.draw(hs.sampled_from([0.0, 1e-2]), "weight_decay")
    seed = data.draw(hs.integers(0, 2**31 - 1), "seed")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    linear = torch.nn.Linear(d, D, bias=bias, dtype=torch.float64)
    head = stt.FactoredLinear.from_linear(linear)
    opt_dense = torch.optim.SGD(linear.parameters(), lr=lr, weight_decay=weight_decay)
    opt_head = stt.FactoredSGD(head, lr=lr, weight_decay=weight_decay)
    tol = 1e-9
    for _ in range(data.draw(hs.integers(1, 3), "steps")):
        m = data.draw(hs.integers(1, 10), "m")
        kind = data.draw(hs.sampled_from(["class", "class_ignore", "csr"]), "kind")
        target = torch_targets(kind, m, D, rng, form=data.draw(hs.sampled_from(["sparse", "tuple"])))
        x = torch.from_numpy(rng.standard_normal((m, d)))
        if kind == "class_ignore" and bool((target == -100).all()) and reduction == "mean":
            continue  # the mean over no rows is NaN in both; nothing to compare
        with torch.no_grad():  # the z-loss's variance from q and s: rounding amplified by mean(o^2) / var(o)
            O = linear(x)
            var = O.var(1, unbiased=False)
            ratio = ((O * O).mean(1) / torch.where(var > 0, var, torch.full_like(var, float("inf")))).max()
        tol = max(tol, 1e-9 * max(1.0, float(ratio))) if loss == "z_loss" else tol
        x_dense = x.clone().requires_grad_(True)
        x_head = x.clone().requires_grad_(True)
        opt_dense.zero_grad()
        opt_head.zero_grad()
        L_dense = torch_dense_loss(linear(x_dense), target, loss, LOSSES[loss], reduction)
        try:
            L_head = stt.linear_spherical_loss(x_head, head, target, loss=loss, reduction=reduction, **LOSSES[loss])
        except ValueError as err:  # z-loss without variance: refused before anything changed
            assert "variance" in str(err), err
            continue
        L_dense.backward()
        L_head.backward()
        assert max_rel(L_head, L_dense) < tol
        assert max_rel(x_head.grad, x_dense.grad) < tol
        opt_dense.step()
        opt_head.step()
        assert max_rel(head.dense_weight(), linear.weight) < tol
        if bias:
            assert max_rel(head.dense_bias(), linear.bias) < tol


@given(data=hs.data())
def test_torch_every_raise_leaves_the_state_bit_identical(data):
    torch = pytest.importorskip("torch")
    import sparsetarget.torch as stt

    D = data.draw(hs.integers(2, 20), "D")
    d = data.draw(hs.integers(1, 6), "d")
    m = data.draw(hs.integers(1, 5), "m")
    bad = data.draw(hs.sampled_from(["nan_x", "label_range", "crow_decreasing", "crow_end", "crow_start",
                                     "col_range", "float_label", "lr_str"]), "bad")
    head = stt.FactoredLinear(d, D, bias=data.draw(hs.booleans()), dtype=torch.float64)
    before = {k: v.clone() for k, v in head.state_dict().items() if isinstance(v, torch.Tensor)}
    x = torch.randn(m, d, dtype=torch.float64)
    target: object = torch.randint(0, D, (m,))
    lr: object = 0.1
    cols, vals = torch.tensor([0, 1]), torch.ones(2, dtype=torch.float64)
    if bad == "nan_x":
        x[0, 0] = float("nan")
    elif bad == "label_range":
        target[0] = D
    elif bad == "crow_decreasing":
        target = (torch.tensor([0, 2] + [1] * (m - 1)), cols, vals) if m > 1 else (torch.tensor([2, 0]), cols, vals)
    elif bad == "crow_end":
        target = (torch.tensor([0] + [1] * m), cols, vals)
    elif bad == "crow_start":
        target = (torch.tensor([1] + [2] * m), cols, vals)
    elif bad == "col_range":
        target = (torch.tensor([0] + [2] * m), torch.tensor([0, D]), vals)
    elif bad == "float_label":
        target = target.double()
    elif bad == "lr_str":
        lr = "0.1"
    with pytest.raises((ValueError, TypeError)):
        opt = stt.FactoredSGD(head, lr=lr)
        stt.linear_spherical_loss(x, head, target).backward()
        opt.step()
    for k, v in head.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k
