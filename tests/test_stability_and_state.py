"""Stabilisation keeps W, state save/load resumes bit-exactly, dense views match, and a soak run checks drift."""

import numpy as np
import pytest
import sparsetarget as st
from conftest import make_targets
from reference import DenseSGD, dense_loss, dense_targets, rel_err
from sparsetarget._engine import Stat

D, d = 211, 17
BAND = (0.5, 2.0)  # the band these tests' bounds are written for (corrections leave U within s [0.707, 1.414])


def ill_conditioned(layer, rng, cond=1e4):
    """Re-factor the layer with a U of condition ~cond, keeping W: V <- W U^-1 (omega = 0 here)."""
    W = layer.dense_weight()
    P, _ = np.linalg.qr(rng.standard_normal((d, d)))
    R, _ = np.linalg.qr(rng.standard_normal((d, d)))
    sig = np.geomspace(1 / np.sqrt(cond), np.sqrt(cond), d)
    U = (P * sig) @ R.T
    sd = layer.state_dict()
    sd["V"] = np.ascontiguousarray(W @ np.linalg.inv(U))
    sd["U"], sd["U_inv"] = U, np.linalg.inv(U)
    describe_U(sd)
    layer.load_state_dict(sd)
    assert np.linalg.cond(layer.state_dict()["U"]) > cond / 2
    return W


def describe_U(sd):
    """Record U's singular values in the monitoring scalars, as a check would have: a state edited by hand must say
    what its U is, since the monitoring carries bounds from them instead of checking every step."""
    sv = np.linalg.svd(sd["U"], compute_uv=False)
    sd["stats"] = sd["stats"].copy()
    sd["stats"][int(Stat.sigma_max)], sd["stats"][int(Stat.sigma_min)] = sv.max(), sv.min()


def test_correction_restores_conditioning_and_keeps_W(rng):
    layer = st.FactoredOutput(rng.standard_normal((D, d)), sigma_range=BAND)
    W = ill_conditioned(layer, rng)
    assert rel_err(layer.dense_weight(), W) < 1e-11
    report = layer.stabilize()
    assert report["corrected"] and report["values_corrected"] > 0
    sv = np.linalg.svd(layer.state_dict()["U"], compute_uv=False)
    assert sv.max() <= np.sqrt(2) + 1e-9 and sv.min() >= np.sqrt(0.5) - 1e-9
    assert rel_err(layer.dense_weight(), W) < 1e-11
    assert layer.diagnostics()["inverse_error"] < 1e-12
    assert layer.diagnostics()["corrections"] == 1


@pytest.mark.parametrize("cond", [20.0, 1e5])  # few values out of band (rank-k pass) / most of them (d x d pass)
def test_monitoring_triggers_correction_during_training(rng, cond):
    layer = st.FactoredOutput(rng.standard_normal((D, d)) / np.sqrt(d), loss="spherical_softmax", sigma_range=BAND)
    W0 = ill_conditioned(layer, rng, cond)
    dense = DenseSGD(W0)
    for _ in range(3):
        H = rng.standard_normal((5, d)) / np.sqrt(d)
        y = rng.integers(0, D, 5)
        Y, _ = dense_targets(y, 5, D)
        L_ref, g_ref = dense.step(H, Y, "spherical_softmax", {}, 0.1)
        L, g = layer.step(H, y, 0.1)
        assert rel_err(L, L_ref) < 1e-9 and rel_err(g, g_ref) < 1e-9
    diag = layer.diagnostics()
    assert diag["corrections"] >= 1
    assert diag["condition"] < 4
    assert rel_err(layer.dense_weight(), dense.W) < 1e-9


def test_refresh_recomputes_small_state(rng):
    layer = st.FactoredOutput(rng.standard_normal((D, d)), refresh_every=3)
    for _ in range(3):
        layer.step(rng.standard_normal((4, d)) / np.sqrt(d), rng.integers(0, D, 4), 0.05, 0.01)
    assert layer.diagnostics()["refreshes"] == 2  # construction + step 3
    W = layer.dense_weight()
    sd = layer.state_dict()
    assert rel_err(sd["Q"], W.T @ W) < 1e-13 and rel_err(sd["w_bar"], W.sum(0)) < 1e-13


def test_state_dict_and_file_resume_bit_exactly(rng, tmp_path):
    layer = st.FactoredOutput(rng.standard_normal((D, d)).astype(np.float32), loss="z_loss", state_dtype=np.float64,
                              a=0.5, b=2.0)
    batches = [(rng.standard_normal((6, d)).astype(np.float32), make_targets("csr", 6, D, rng)) for _ in range(6)]
    for H, y in batches[:3]:
        layer.step(H, y, 0.1, 0.01)
    sd = layer.state_dict()
    layer.save(tmp_path / "layer.npz")
    resumed_mem = st.FactoredOutput(np.zeros((D, d), np.float32), loss="z_loss", state_dtype=np.float64)
    resumed_mem.load_state_dict(sd)
    resumed_file = st.FactoredOutput.load(tmp_path / "layer.npz")
    assert resumed_file.loss_options == {"a": 0.5, "b": 2.0}
    out = [lay.step(H, y, 0.1, 0.01) for H, y in batches[3:] for lay in (layer, resumed_mem, resumed_file)]
    for i in range(0, len(out), 3):
        for k in range(2):
            assert out[i][k].tobytes() == out[i + 1][k].tobytes() == out[i + 2][k].tobytes()
    for key in ("V", "U", "U_inv", "Q", "omega", "w_bar", "stats"):
        a, b, c = (lay.state_dict()[key] for lay in (layer, resumed_mem, resumed_file))
        assert a.tobytes() == b.tobytes() == c.tobytes(), key


@pytest.mark.parametrize("dtype,state_dtype", [(np.float64, np.float64), (np.float32, np.float64),
                                               (np.float64, np.float32)])
def test_dense_views_match_materialised_W(rng, dtype, state_dtype):
    Dbig = 9001  # more than two tiles of the tiled views
    layer = st.FactoredOutput.random(Dbig, d, dtype=dtype, state_dtype=state_dtype, seed=5, loss="taylor_softmax")
    for _ in range(3):
        layer.step(rng.standard_normal((4, d)) / np.sqrt(d), rng.integers(0, Dbig, 4), 0.2, 0.05)
    W = layer.dense_weight().astype(np.float64)
    sd = layer.state_dict()
    W_fact = sd["V"].astype(np.float64) @ sd["U"].astype(np.float64) + sd["omega"]
    tol = 1e-12 if dtype == state_dtype == np.float64 else 1e-5
    assert rel_err(W, W_fact) < tol
    assert rel_err(layer.dense_weight(100, 5000), W[100:5000]) < tol
    H = rng.standard_normal((3, d))
    O = H @ W.T
    assert rel_err(layer.logits(H), O) < tol
    assert rel_err(layer.logits(H, 17, 8200), O[:, 17:8200]) < tol
    vals, idx = layer.topk(H, 7)
    ref_idx = np.argsort(-O, axis=1, kind="stable")[:, :7]
    assert np.array_equal(idx, ref_idx)
    assert rel_err(vals, np.take_along_axis(O, ref_idx, 1)) < tol
    y = rng.integers(0, Dbig, 3)
    Y, _ = dense_targets(y, 3, Dbig)
    lp_ref = -dense_loss("taylor_softmax", O, Y, {})[0]
    assert rel_err(layer.log_prob(H, y), lp_ref) < tol
    eps = 0.3
    lp_sph = np.log(O[np.arange(3), y] ** 2 + eps) - np.log((O**2).sum(1) + Dbig * eps)
    sph = st.FactoredOutput(W, loss="spherical_softmax", eps=eps)
    assert rel_err(sph.log_prob(H, y), lp_sph) < 1e-10
    # Ranking by probability: spherical softmax ranks by o^2 (so a large negative output ranks high), Taylor
    # softmax by 1 + o + o^2/2; the values are the exact log-probabilities of the dense distribution.
    cases = ((sph, "spherical_softmax", O**2 + eps, 1e-10), (layer, "taylor_softmax", 1 + O + O**2 / 2, tol))
    for layer_k, kind, num, tol_k in cases:
        log_p = np.log(num / num.sum(1, keepdims=True))
        vals, idx = layer_k.topk(H, 9, by="probability")
        ref_idx = np.argsort(-num, axis=1, kind="stable")[:, :9]
        assert np.array_equal(idx, ref_idx), kind
        if kind == "spherical_softmax":  # large negative outputs rank high: not the ranking by output
            assert not np.array_equal(idx, np.argsort(-O, axis=1, kind="stable")[:, :9])
        assert rel_err(vals, np.take_along_axis(log_p, ref_idx, 1)) < tol_k, kind
    vals_t, idx_t = sph.topk(H, 4, by="probability", kind="taylor_softmax")
    assert np.array_equal(idx_t, np.argsort(-(1 + O + O**2 / 2), axis=1, kind="stable")[:, :4])
    with pytest.raises(ValueError, match="by must"):
        sph.topk(H, 3, by="prob")


def test_random_init_like_nn_linear():
    a = st.FactoredOutput.random(1000, 64, seed=3)
    b = st.FactoredOutput.random(1000, 64, seed=3)
    W = a.dense_weight()
    assert W.dtype == np.float32 and np.array_equal(W, b.dense_weight())
    assert np.abs(W).max() <= 1 / 8 and np.abs(W).max() > 0.12
    assert rel_err(a.state_dict()["Q"], W.astype(np.float64).T @ W.astype(np.float64)) < 1e-6


@pytest.mark.parametrize("dtype,consistency_limit", [(np.float64, 1e-12), (np.float32, 1e-4)])
def test_soak_drift_against_dense(dtype, consistency_limit):
    """400 steps with |h| ~ 1, Zipf targets and weight decay; checks the drift against dense float64 SGD.

    Training is sensitive to rounding (a dense run started 1e-15 away drifts too), so W is compared with the
    spread of same-precision dense runs: a 1-ulp perturbed float64 run, or plain float32 SGD for float32.
    Q and w_bar are compared with the layer's own W, which no chaos excuses.
    """
    rng = np.random.default_rng(11)
    Dn, dn, m, lr = 1500, 24, 16, 0.1
    W0 = (rng.uniform(-1, 1, (Dn, dn)) / np.sqrt(dn)).astype(dtype)
    layer = st.FactoredOutput(W0, loss="spherical_softmax")
    dense = DenseSGD(W0)
    if dtype == np.float64:
        peer = DenseSGD(W0 * (1 + 2**-52))
    else:
        peer = DenseSGD(W0, dtype=np.float32)
    for _ in range(400):
        H = rng.standard_normal((m, dn)) / np.sqrt(dn)
        y = rng.zipf(1.3, m) % Dn
        Y, _ = dense_targets(y, m, Dn)
        dense.step(H, Y, "spherical_softmax", {}, lr, 1e-3)
        peer.step_with(H.astype(peer.W.dtype), lambda O, Y=Y: tuple(
            x.astype(peer.W.dtype) for x in dense_loss("spherical_softmax", O, Y, {})), lr, 1e-3)
        layer.step(H.astype(dtype), y, lr, 1e-3)
    W = layer.dense_weight().astype(np.float64)
    sd = layer.state_dict()
    drift = {
        "W": rel_err(W, dense.W),
        "W_same_precision_dense": rel_err(peer.W, dense.W),
        "Q_vs_WtW": rel_err(sd["Q"], W.T @ W),
        "w_bar_vs_W1": rel_err(sd["w_bar"], W.sum(0)),
        "inverse_error": layer.diagnostics()["inverse_error"],
        "corrections": layer.diagnostics()["corrections"],
    }
    # W: relative distance to the dense float64 run; it may be large in absolute terms (the run is chaotic), but no
    # larger than the distance of a same-precision dense run, which is what rounding alone does.
    assert drift["W"] < 3 * drift["W_same_precision_dense"] + 1e-12, drift
    assert drift["Q_vs_WtW"] < consistency_limit and drift["w_bar_vs_W1"] < consistency_limit, drift
    assert drift["inverse_error"] < 100 * consistency_limit, drift


@pytest.mark.parametrize("width", [16, 37, 64])
@pytest.mark.parametrize("m", [1, 40])
def test_Q_and_w_bar_track_W_and_Q_stays_symmetric(width, m):
    """After steps, Q = W^T W and w_bar = W^T 1 to rounding, and Q is exactly symmetric (it is updated on one
    triangle and mirrored in tiles; widths at, across and between tile edges)."""
    rng = np.random.default_rng(width + m)
    layer = st.FactoredOutput(rng.standard_normal((97, width)) / np.sqrt(width), loss="taylor_softmax")
    for _ in range(5):
        layer.step(rng.standard_normal((m, width)) / np.sqrt(width), rng.integers(0, 97, m), 0.1, 0.01)
    sd = layer.state_dict()
    W = layer.dense_weight()
    assert np.array_equal(sd["Q"], sd["Q"].T)
    assert rel_err(sd["Q"], W.T @ W) < 1e-12
    assert rel_err(sd["w_bar"], W.sum(0)) < 1e-12


def refactor(layer, U):
    """Re-factor the layer with the given U, keeping W: V <- W U^-1 (omega = 0 here)."""
    W = layer.dense_weight()
    sd = layer.state_dict()
    sd["V"] = np.ascontiguousarray(W @ np.linalg.inv(U))
    sd["U"], sd["U_inv"] = U, np.linalg.inv(U)
    describe_U(sd)
    layer.load_state_dict(sd)
    return W


def test_uniform_scale_of_U_needs_no_correction(rng):
    """Squared error shrinks U every step; a uniform scale is harmless and must not cost passes over V."""
    layer = st.FactoredOutput(rng.standard_normal((D, d)) / np.sqrt(d), loss="spherical_softmax")
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    W = refactor(layer, 1e-3 * Q)
    report = layer.stabilize()
    assert not report["corrected"] and report["values_corrected"] == 0
    layer.step(rng.standard_normal((4, d)) / np.sqrt(d), rng.integers(0, D, 4), 0.0)  # monitoring runs
    assert layer.diagnostics()["corrections"] == 0
    assert rel_err(layer.dense_weight(), W) < 1e-9


def test_scale_far_from_one_is_reset_by_one_pass_and_spread_relative_to_it(rng):
    layer = st.FactoredOutput(rng.standard_normal((D, d)) / np.sqrt(d), sigma_range=BAND)
    P, _ = np.linalg.qr(rng.standard_normal((d, d)))
    R, _ = np.linalg.qr(rng.standard_normal((d, d)))
    W = refactor(layer, 1e-9 * (P * np.linspace(0.9, 1.1, d)) @ R.T)  # beyond the 2^-24 scale limit
    report = layer.stabilize()
    assert report["corrected"] and report["values_corrected"] == 0  # a scale only: no singular value moved apart
    sv = np.linalg.svd(layer.state_dict()["U"], compute_uv=False)
    assert 0.85 < sv.min() and sv.max() < 1.15
    assert rel_err(layer.dense_weight(), W) < 1e-11
    # far spread around a small (but allowed) scale: out-of-band values go to the scale, not to 1
    W = refactor(layer, 1e-3 * (P * np.geomspace(0.01, 100, d)) @ R.T)
    report = layer.stabilize()
    assert report["corrected"] and report["values_corrected"] > 0
    sv = np.linalg.svd(layer.state_dict()["U"], compute_uv=False)
    assert sv.max() / sv.min() <= 2 + 1e-9 and 1e-3 * np.sqrt(0.5) - 1e-12 <= sv.min() <= sv.max() <= 1e-3 * np.sqrt(2)
    assert rel_err(layer.dense_weight(), W) < 1e-11
    assert layer.diagnostics()["inverse_error"] < 1e-9


def test_scale_trigger_alone_rescales_without_moving_singular_values(rng):
    """A correction called because U's scale left 2^+-24 (its spread within the trigger) rescales U by one pass and
    rebuilds U^-1, but moves no singular value back into the band; stabilize() on demand moves them."""
    layer = st.FactoredOutput(rng.standard_normal((D, d)) / np.sqrt(d), loss="spherical_softmax", sigma_range=BAND,
                              check_every=1)
    P, _ = np.linalg.qr(rng.standard_normal((d, d)))
    R, _ = np.linalg.qr(rng.standard_normal((d, d)))
    spread = np.geomspace(0.6, 1.6, d)  # 2.7 < 4: no spread trigger, yet values outside s [0.707, 1.414]
    W0 = refactor(layer, 1e-9 * (P * spread) @ R.T)
    dense = DenseSGD(W0)
    H, y = rng.standard_normal((3, d)) / np.sqrt(d), rng.integers(0, D, 3)
    dense.step(H, dense_targets(y, 3, D)[0], "spherical_softmax", {}, 0.05)
    layer.step(H, y, 0.05)
    diag = layer.diagnostics()
    assert diag["corrections"] == 1 and diag["corrected_values"] == 0
    sv = np.linalg.svd(layer.state_dict()["U"], compute_uv=False)
    assert 0.5 < sv.min() and sv.max() < 2 and sv.max() / sv.min() > 2.5  # rescaled to 1, the spread kept
    assert rel_err(layer.dense_weight(), dense.W) < 1e-10
    report = layer.stabilize()
    assert report["values_corrected"] > 0 and report["sigma_max_after"] / report["sigma_min_after"] <= 2 + 1e-9


def train_squared_error_unit_rows(steps, seed, **policy):
    """A layer and dense SGD trained alike on squared error, 8 rows of |h| = 1 per step at lr 0.05 (U shrinks at
    every step)."""
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((D, d)) / np.sqrt(d)
    layer = st.FactoredOutput(W0, loss="squared_error", **{"sigma_range": BAND, **policy})
    dense = DenseSGD(W0)
    for _ in range(steps):
        H = rng.standard_normal((8, d))
        H /= np.linalg.norm(H, axis=1, keepdims=True)
        y = rng.integers(0, D, 8)
        Y, _ = dense_targets(y, 8, D)
        dense.step(H, Y, "squared_error", {}, 0.05)
        layer.step(H, y, 0.05)
    return layer, dense


def test_squared_error_training_with_shrinking_U_stays_exact():
    """300 steps of squared error with |h| = 1 shrink U by ~400x; W still matches dense SGD and only few
    (rank-k) corrections run."""
    layer, dense = train_squared_error_unit_rows(300, seed=0)
    diag = layer.diagnostics()
    assert diag["sigma_max"] < 0.01  # U shrank a lot ...
    assert diag["corrections"] <= 20 and diag["condition"] < 4  # ... without a correction per step
    assert rel_err(layer.dense_weight(), dense.W) < 1e-9


@pytest.mark.parametrize("state_dtype, spread, tol", [(np.float64, 25, 1e-9), (np.float32, 100, 1e-4)])
def test_default_band_of_each_state_dtype_keeps_squared_error_training_exact(state_dtype, spread, tol):
    """The default band depends on the state dtype ((0.2, 5) for float64, (0.1, 10) for float32): 600 steps that
    spread U's singular values (and shrink them) stay within the band's spread, correct a few times, and follow
    dense float64 SGD."""
    layer, dense = train_squared_error_unit_rows(600, seed=1, sigma_range=None, state_dtype=state_dtype)
    assert layer.config()["sigma_range"] == [1 / np.sqrt(spread), np.sqrt(spread)]
    diag = layer.diagnostics()
    assert diag["condition"] < spread
    assert 1 <= diag["corrections"] <= 10
    assert rel_err(layer.dense_weight(), dense.W) < tol


@pytest.mark.parametrize("m", [1, 6, 40])  # Woodbury (m < d) and explicit (m > d) steps
@pytest.mark.parametrize("loss", ["squared_error", "spherical_softmax"])
def test_monitoring_bounds_carried_across_unchecked_steps_contain_U(rng, m, loss):
    """Between checks the monitored singular values widen by the step's factor bounds: they must contain the
    true extreme singular values of the new U (starting from exact ones), and be tight enough to be useful."""
    layer = st.FactoredOutput(rng.standard_normal((D, d)) / np.sqrt(d), loss=loss, check_every=10**6,
                              sigma_range=BAND)
    P, _ = np.linalg.qr(rng.standard_normal((d, d)))
    R, _ = np.linalg.qr(rng.standard_normal((d, d)))
    refactor(layer, (P * np.geomspace(0.8, 1.25, d)) @ R.T)
    unchecked = 0
    for _ in range(8):
        before = layer.state_dict()
        H = rng.standard_normal((m, d)) / np.sqrt(d)
        layer.step(H, rng.integers(0, D, m), 0.05 / m, 0.1)
        sd = layer.state_dict()
        if not np.array_equal(sd["probe_max"], before["probe_max"]):
            describe_U(sd)  # a check ran: start again from exact values
            layer.load_state_dict(sd)
            continue
        unchecked += 1
        sv = np.linalg.svd(sd["U"], compute_uv=False)
        hi, lo = sd["stats"][int(Stat.sigma_max)], sd["stats"][int(Stat.sigma_min)]
        assert lo <= sv.min() * (1 + 1e-12) and sv.max() <= hi * (1 + 1e-12)
        assert hi / lo < 4 * sv.max() / sv.min()  # not vacuous
    assert unchecked >= 4


def test_monitoring_runs_before_its_turn_when_U_may_leave_the_band():
    """Squared error shrinks U fast; with the regular check far away, the carried bounds still call the checks
    (and corrections) that keep U in band, and W follows dense SGD."""
    layer, dense = train_squared_error_unit_rows(150, seed=3, check_every=10**6)
    diag = layer.diagnostics()
    assert diag["corrections"] >= 1 and diag["condition"] < 4
    assert rel_err(layer.dense_weight(), dense.W) < 1e-9


def test_repeated_example_at_large_lr_is_checked_in_time():
    """40 repeated examples at lr 0.45 drive U towards singular within a few steps; the carried bounds call the
    checks (and corrections) at once, and W follows dense SGD."""
    rng = np.random.default_rng(7)
    W0 = rng.standard_normal((61, 5)) / np.sqrt(5)
    layer = st.FactoredOutput(W0, loss="squared_error")
    dense = DenseSGD(W0)
    h = rng.standard_normal((1, 5))
    h /= np.linalg.norm(h)
    Y, _ = dense_targets(np.array([3]), 1, 61)
    for _ in range(40):
        dense.step(h, Y, "squared_error", {}, 0.45)
        layer.step(h, np.array([3]), 0.45)
    low, high = layer.config()["sigma_range"]
    assert layer.diagnostics()["condition"] < high / low  # U was kept within the default band's spread
    assert rel_err(layer.dense_weight(), dense.W) < 1e-9
