"""The NumPy and torch front ends sit on one engine and follow one rule: the same names, the same values on
ignored rows, the same output dtypes."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import sparsetarget as st  # noqa: E402
import sparsetarget.torch as stt  # noqa: E402
from conftest import make_targets  # noqa: E402

D, d = 41, 6
NAMES = ("dense_weight", "logits", "topk", "log_prob", "diagnostics", "stabilize", "refresh", "state_dict",
         "load_state_dict", "set_stabilization", "in_features", "out_features")


def twins(dtype=np.float64, state_dtype=None, seed=0):
    """A NumPy layer and a torch head (no bias) with the same W, dtypes and state."""
    W = (np.random.default_rng(seed).uniform(-1, 1, (D, d)) / np.sqrt(d)).astype(dtype)
    layer = st.FactoredOutput(W, state_dtype=state_dtype, loss="spherical_softmax", eps=0.05)
    tdt = {np.float32: torch.float32, np.float64: torch.float64}
    head = stt.FactoredLinear(d, D, weight=torch.from_numpy(W), dtype=tdt[dtype],
                              state_dtype=tdt[state_dtype or dtype])
    return layer, head


def test_the_same_names_in_both_front_ends():
    layer, head = twins()
    for name in NAMES:
        assert hasattr(layer, name) and hasattr(head, name), name
    assert (layer.in_features, layer.out_features) == (head.in_features, head.out_features) == (d, D)
    for gone in ("weight", "num_outputs", "hidden_size"):
        assert not hasattr(layer, gone), gone
    assert np.array_equal(layer.dense_weight(), head.dense_weight().numpy())


def test_ignored_rows_give_the_same_values_in_both_front_ends():
    layer, head = twins()
    rng = np.random.default_rng(1)
    H = rng.standard_normal((7, d))
    y = make_targets("class_ignore", 7, D, rng)
    ignored = y == -100
    assert ignored.any() and not ignored.all()
    A, q, s = layer.forward(H, y)
    with torch.no_grad():
        out = head(torch.from_numpy(H), torch.from_numpy(y))
    for a, b in ((A, out.A), (q, out.q), (s, out.s)):
        assert np.array_equal(a, b.numpy())
    assert np.all(A[ignored] == 0)
    lp = layer.log_prob(H, y)
    lp_t = head.log_prob(torch.from_numpy(H), torch.from_numpy(y), eps=0.05)
    assert np.all(lp[ignored] == 0) and np.all(lp[~ignored] < 0)
    assert np.allclose(lp, lp_t.detach().numpy(), rtol=1e-14, atol=0)
    values, indices = layer.topk(H, 5, by="probability")
    top_t = head.topk(torch.from_numpy(H), 5, by="probability", eps=0.05)
    assert np.array_equal(indices, top_t.indices.numpy()) and np.allclose(values, top_t.values.numpy(), rtol=1e-14)


@pytest.mark.parametrize("state_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("input_dtype", [np.float16, np.float32, np.float64])
def test_output_dtypes_follow_one_rule(input_dtype, state_dtype):
    """A, q, s, logits, top-k values and log-probabilities in the state dtype; grad_H in the input's dtype."""
    layer, head = twins(np.float32, state_dtype)
    rng = np.random.default_rng(2)
    H = rng.standard_normal((5, d)).astype(input_dtype)
    y = make_targets("class_ignore", 5, D, rng)
    sdt = np.dtype(state_dtype)
    tdt = torch.from_numpy(np.zeros(0, sdt)).dtype
    h = torch.from_numpy(H)
    for x in (*layer.forward(H, y), layer.logits(H), layer.topk(H, 3)[0], layer.topk(H, 3, by="probability")[0],
              layer.log_prob(H, y)):
        assert x.dtype == sdt
    with torch.no_grad():
        out = head(h, torch.from_numpy(y))
        for x in (out.A, out.q, out.s, head.logits(h), head.topk(h, 3).values,
                  head.topk(h, 3, by="probability").values, head.log_prob(h, torch.from_numpy(y))):
            assert x.dtype == tdt
    _, grad_np = layer.step(H, y, 0.0)
    A, q, s = layer.forward(H, y)
    grad_split = layer.backward_step(H, y, np.ones_like(A), np.ones_like(q), np.ones_like(s), 0.0)
    x = h.clone().requires_grad_(True)
    stt.linear_spherical_loss(x, head.requires_grad_(False), torch.from_numpy(y), loss="squared_error",
                              reduction="sum").backward()
    assert grad_np.dtype == grad_split.dtype == H.dtype and x.grad.dtype == h.dtype
    # the same gradient (squared error: the built-in loss of step) in both front ends
    layer_se = st.FactoredOutput(layer.dense_weight(), state_dtype=state_dtype)
    _, grad_se = layer_se.step(H, y, 0.0)
    rtol = 2e-3 if input_dtype == np.float16 else 1e-5  # one float16 ulp; float32 state rounding
    assert np.allclose(grad_se.astype(np.float64), x.grad.double().numpy(), rtol=rtol, atol=1e-6)
