"""Bad input raises a clear error naming the argument and leaves the layer bit-identical."""

import numpy as np
import pytest
import sparsetarget as st
from conftest import CSR

D, d = 50, 6


@pytest.fixture
def layer():
    rng = np.random.default_rng(3)
    lay = st.FactoredOutput(rng.standard_normal((D, d)) / np.sqrt(d), loss="spherical_softmax")
    lay.step(rng.standard_normal((4, d)) / np.sqrt(d), rng.integers(0, D, 4), 0.1)  # a non-trivial state
    return lay


def snapshot(layer):
    return {k: v for k, v in layer.state_dict().items() if k != "config"}


def assert_unchanged(layer, before):
    after = snapshot(layer)
    for k in before:
        assert np.array_equal(before[k], after[k]), k
        assert before[k].tobytes() == after[k].tobytes(), k


H_OK = np.full((2, d), 0.1)
Y_OK = np.array([1, 2])

BAD_STEPS = [
    ("H", dict(H=np.zeros((2, d + 1))), ValueError),
    ("H", dict(H=np.zeros(d)), ValueError),
    ("H", dict(H=np.zeros((0, d))), ValueError),
    ("H", dict(H=np.zeros((2, d), dtype=np.int64)), TypeError),
    ("H", dict(H=np.array([[np.nan] * d, [0.0] * d])), ValueError),
    ("H", dict(H=np.array([[np.inf] * d, [0.0] * d])), ValueError),
    ("targets", dict(targets=np.array([1, D])), ValueError),
    ("targets", dict(targets=np.array([1, -1])), ValueError),
    ("targets", dict(targets=np.array([1, 2, 3])), ValueError),
    ("targets", dict(targets=np.array([1.0, 2.0])), TypeError),
    ("targets", dict(targets=np.array([True, False])), TypeError),
    ("targets", dict(targets=CSR([0, 1, 2], [3, D], [1.0, 1.0], (2, D))), ValueError),
    ("targets", dict(targets=CSR([0, 1, 2], [3, 4], [1.0, np.nan], (2, D))), ValueError),
    ("targets", dict(targets=CSR([0, 1, 2], [3, 4], [1.0, 1.0], (2, D + 1))), ValueError),
    ("targets", dict(targets=CSR([0, 2, 1], [3, 4], [1.0, 1.0], (2, D))), ValueError),
    ("lr", dict(lr=float("nan")), ValueError),
    ("lr", dict(lr=float("inf")), ValueError),
    ("lr", dict(lr=-0.1), ValueError),
    ("lr", dict(lr="fast"), TypeError),
    ("lr", dict(lr=True), TypeError),
    ("weight_decay", dict(weight_decay=np.bool_(False)), TypeError),
    ("weight_decay", dict(weight_decay=-1.0), ValueError),
    ("weight_decay", dict(weight_decay=float("nan")), ValueError),
    ("lr \\* weight_decay", dict(lr=0.5, weight_decay=2.0), ValueError),
]


@pytest.mark.parametrize("name,change,exc", BAD_STEPS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_STEPS)])
def test_bad_step_input_raises_and_keeps_state(layer, name, change, exc):
    args = dict(H=H_OK, targets=Y_OK, lr=0.1, weight_decay=0.0)
    args.update(change)
    before = snapshot(layer)
    with pytest.raises(exc, match=name):
        layer.step(args["H"], args["targets"], args["lr"], args["weight_decay"])
    assert_unchanged(layer, before)


@pytest.mark.parametrize("which", ["dA", "dq", "ds"])
def test_bad_derivatives_raise_and_keep_state(layer, which):
    before = snapshot(layer)
    good = {"dA": np.ones(2), "dq": np.ones(2) * 0.1, "ds": np.ones(2)}
    cases = [(np.array([np.nan, 0.0]), ValueError), (np.ones(3), ValueError), (np.array(["a", "b"]), TypeError)]
    for bad, exc in cases:
        args = dict(good, **{which: bad})
        with pytest.raises(exc, match=which):
            layer.backward_step(H_OK, Y_OK, args["dA"], args["dq"], args["ds"], 0.1)
        assert_unchanged(layer, before)


def test_singular_update_small_batch_refused(layer):
    """m < d (Woodbury branch): squared error has dL/dq = 1, so M = I - 2 lr h h^T is singular at lr = 1/(2|h|^2)."""
    lay = st.FactoredOutput(layer.dense_weight(), loss="squared_error")
    h = np.random.default_rng(0).standard_normal((1, d))
    before = snapshot(lay)
    with pytest.raises(st.SingularUpdateError, match="lr"):
        lay.step(h, np.array([3]), 1.0 / (2 * float(h[0] @ h[0])))
    assert_unchanged(lay, before)
    with pytest.raises(ValueError, match="singular"):  # SingularUpdateError is a ValueError
        lay.step(h, np.array([3]), (1 - 1e-10) / (2 * float(h[0] @ h[0])))  # would lose 10 of 16 digits
    assert_unchanged(lay, before)
    lay.step(h, np.array([3]), 0.25 / float(h[0] @ h[0]))  # a sane lr still works afterwards


def test_singular_update_large_batch_refused(layer):
    """m >= d (explicit inverse branch): M = I - 2 lr H^T H is singular at lr = 1 / (2 lambda_max(H^T H))."""
    lay = st.FactoredOutput(layer.dense_weight(), loss="squared_error")
    H = np.random.default_rng(1).standard_normal((3 * d, d))
    lam = np.linalg.eigvalsh(H.T @ H).max()
    before = snapshot(lay)
    with pytest.raises(st.SingularUpdateError, match="singular"):
        lay.step(H, np.arange(3 * d) % D, 1.0 / (2 * lam))
    assert_unchanged(lay, before)


def test_overflowing_step_refused(layer):
    before = snapshot(layer)
    with pytest.raises(ValueError, match="non-finite|not finite"):
        layer.backward_step(H_OK, Y_OK, np.ones(2), np.zeros(2), np.array([1e308, 1e308]), 1e10)
    assert_unchanged(layer, before)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(loss="spherical_softmax", eps=0.0), ValueError, "eps"),
        (dict(loss="spherical_softmax", eps=-1.0), ValueError, "eps"),
        (dict(loss="z_loss", a=0.0), ValueError, "a must"),
        (dict(loss="z_loss", a=-2.0), ValueError, "a must"),
        (dict(loss="z_loss", b=float("nan")), ValueError, "b must"),
        (dict(loss="squared_error", eps=0.1), TypeError, "options"),
        (dict(loss="softmax"), ValueError, "loss must be one of"),
        (dict(state_dtype=np.float16), TypeError, "state_dtype"),
        (dict(sigma_range=(2.0, 0.5)), ValueError, "sigma_range"),
        (dict(check_every=-1), ValueError, "check_every"),
        (dict(check_every=2**63), ValueError, "check_every"),
        (dict(check_every=np.uint64(2**63)), ValueError, "check_every"),
        (dict(refresh_every=2**64), ValueError, "refresh_every"),
        (dict(ignore_index=True), TypeError, "ignore_index"),
        (dict(ignore_index=2.0), TypeError, "ignore_index"),
        (dict(min_rcond=2.0), ValueError, "min_rcond"),
    ],
)
def test_bad_constructor_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        st.FactoredOutput(np.ones((4, 3)), **kwargs)


@pytest.mark.parametrize(
    "weight,exc,match",
    [
        (np.ones((4, 3), dtype=np.int32), TypeError, "weight"),
        (np.ones(4), ValueError, "weight"),
        (np.ones((0, 3)), ValueError, "weight"),
        (np.array([[1.0, np.nan]]), ValueError, "weight"),
    ],
)
def test_bad_weight(weight, exc, match):
    with pytest.raises(exc, match=match):
        st.FactoredOutput(weight)


def test_read_only_weight_without_copy_is_named():
    w = np.ones((4, 3))
    w.flags.writeable = False
    with pytest.raises(ValueError, match="weight is read-only"):
        st.FactoredOutput(w, copy=False)
    st.FactoredOutput(w)  # copied: fine


def test_policy_out_of_range_changes_nothing(layer):
    """An option the core cannot hold (check_every beyond int64) is refused, naming it, before any option is set."""
    config = layer.config()
    with pytest.raises(ValueError, match="check_every"):
        layer.set_stabilization(sigma_range=(0.5, 2.0), check_every=2**63)
    assert layer.config() == config


def test_z_loss_zero_variance_is_reported():
    lay = st.FactoredOutput(np.zeros((5, 3)), loss="z_loss")
    before = snapshot(lay)
    with pytest.raises(ValueError, match="z_loss.*variance"):
        lay.step(np.ones((1, 3)), np.array([1]), 0.1)
    assert_unchanged(lay, before)


def test_bad_inference_arguments(layer):
    with pytest.raises(ValueError, match="k must"):
        layer.topk(H_OK, 0)
    with pytest.raises(ValueError, match="k must"):
        layer.topk(H_OK, D + 1)
    with pytest.raises(ValueError, match="row range"):
        layer.dense_weight(3, D + 1)
    with pytest.raises(ValueError, match="kind must"):
        st.FactoredOutput(np.ones((4, 3))).log_prob(np.ones((1, 3)), np.array([0]))
    for k in (2.5, True, "3"):
        with pytest.raises(TypeError, match="k must"):
            layer.topk(H_OK, k)
    for eps, exc in ((float("inf"), ValueError), (float("nan"), ValueError), (0.0, ValueError), ("0.5", TypeError),
                     (True, TypeError)):
        with pytest.raises(exc, match="eps"):
            layer.log_prob(H_OK, Y_OK, eps=eps)
        with pytest.raises(exc, match="eps"):
            layer.topk(H_OK, 2, by="probability", eps=eps)


def test_load_state_dict_rejects_mismatch(layer):
    sd = layer.state_dict()
    sd["U"] = sd["U"].astype(np.float32)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="state\\['U'\\]"):
        layer.load_state_dict(sd)
    assert_unchanged(layer, before)


def test_load_state_dict_bad_config_or_keys_change_nothing(layer):
    config = layer.config()
    before = snapshot(layer)
    other = st.FactoredOutput(layer.dense_weight() * 2, loss="squared_error", ignore_index=7).state_dict()
    other["config"]["check_every"] = 2**63  # everything else valid, and different from the layer's
    with pytest.raises(ValueError, match="check_every"):
        layer.load_state_dict(other)
    del other["Q"]
    with pytest.raises(ValueError, match="missing \\['Q'\\]"):
        layer.load_state_dict(other)
    with pytest.raises(TypeError, match="state must be a dict"):
        layer.load_state_dict([("V", layer.dense_weight())])
    assert_unchanged(layer, before)
    assert layer.config() == config


def test_config_and_state_dict_are_copies(layer):
    """Changing the dict that config() or state_dict() returned does not change the layer's loss options."""
    layer.state_dict()["config"]["loss_options"]["eps"] = 0.5
    layer.config()["loss_options"]["eps"] = 0.5
    assert layer.loss_options == {"eps": 0.01} and layer.config()["loss_options"] == {"eps": 0.01}


def test_load_of_a_file_with_a_wrong_dtype_is_a_value_error(layer, tmp_path):
    path = tmp_path / "layer.npz"
    layer.save(path)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["V"] = arrays["V"].astype(np.int32)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="not a valid FactoredOutput file.*V"):
        st.FactoredOutput.load(path)


def test_class_targets_are_copied_and_masked():
    """Class labels become CSR arrays of their own: ignored rows have no entry and are masked in ``active``."""
    labels = np.array([3, 9, 7, 0], dtype=np.int64)
    t = st._targets.to_csr(labels, 4, D, -100)  # nothing ignored: the indices are the labels, in a copy
    assert not np.shares_memory(t.indices, labels) and t.active is None
    assert t.indptr.tolist() == [0, 1, 2, 3, 4] and t.indices.tolist() == [3, 9, 7, 0]
    masked = st._targets.to_csr(np.array([3, -100, 7, 0]), 4, D, -100)
    assert masked.indptr.tolist() == [0, 1, 1, 2, 3] and masked.indices.tolist() == [3, 7, 0]
    assert masked.active.tolist() == [1, 0, 1, 1] and masked.values.tolist() == [1.0, 1.0, 1.0]
    strided = st._targets.to_csr(labels[::2], 2, D, -100)  # a strided int64 view
    assert strided.indices.tolist() == [3, 7] and not np.shares_memory(strided.indices, labels)
    with pytest.raises(ValueError, match=r"labels contains class 50, outside \[0, 50\) and not ignore_index=-1"):
        st._targets.to_csr(np.array([50, -1]), 2, D, -1, name="labels")
    with pytest.raises(ValueError, match="ignore_index"):
        st._targets.to_csr(labels, 4, D, 2**64)
