"""The factored layer against dense float64 SGD: losses, grad_H and W after several steps."""

import subprocess
import sys

import numpy as np
import pytest
import sparsetarget as st
from conftest import CSR, make_targets
from reference import LOSSES, DenseSGD, dense_loss, dense_targets, rel_err

D, d = 101, 13
STEPS = 4


def run_pair(loss, opts, kind, m, weight_decay, dtype=np.float64, state_dtype=None, lr=0.05, steps=STEPS, seed=0,
             shape=(D, d)):
    D, d = shape
    rng = np.random.default_rng(seed)
    W0 = rng.uniform(-1, 1, (D, d)) / np.sqrt(d)
    layer = st.FactoredOutput(W0.astype(dtype), loss=loss, state_dtype=state_dtype, **opts)
    dense = DenseSGD(W0.astype(dtype).astype(np.float64))
    errs = {"loss": 0.0, "grad_H": 0.0}
    for _ in range(steps):
        H = rng.standard_normal((m, d)) / np.sqrt(d)
        targets = make_targets(kind, m, D, rng)
        Y, mask = dense_targets(targets, m, D)
        L_ref, g_ref = dense.step(H, Y, loss, opts, lr, weight_decay, mask)
        L, g = layer.step(H.astype(dtype), targets, lr, weight_decay)
        errs["loss"] = max(errs["loss"], rel_err(L, L_ref))
        errs["grad_H"] = max(errs["grad_H"], rel_err(g, g_ref))
    errs["W"] = rel_err(layer.dense_weight(), dense.W)
    return errs, layer, dense


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("m", [1, 5, 23, 40])  # Woodbury, explicit with the m x m Gram matrix, and without it (m >= 2d)
@pytest.mark.parametrize("kind", ["class", "class_ignore", "csr"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_float64_matches_dense(loss, kind, m, weight_decay):
    errs, _, _ = run_pair(loss, LOSSES[loss], kind, m, weight_decay)
    assert errs["loss"] < 1e-10, errs
    assert errs["grad_H"] < 1e-10, errs
    assert errs["W"] < 1e-10, errs


@pytest.mark.parametrize("core_threads", [1], indirect=True)
@pytest.mark.parametrize("kind", ["class_ignore", "csr"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_large_woodbury_system_from_lu_factors_matches_dense(core_threads, loss, kind):
    """m = 113 < d = 131 on one thread: the m x m Woodbury system is large enough to be solved from its LU factors
    (two triangular solves and the pivots' interchanges) instead of through its inverse."""
    errs, _, _ = run_pair(loss, LOSSES[loss], kind, 113, 0.3, steps=3, shape=(211, 131))
    assert errs["loss"] < 1e-10, errs
    assert errs["grad_H"] < 1e-10, errs
    assert errs["W"] < 1e-10, errs


@pytest.mark.parametrize("core_threads", [1, 2], indirect=True)  # LU factors on one thread, the inverse on two
def test_large_woodbury_system_that_needs_pivoting_matches_dense(core_threads):
    """Unit rows in pairs u, 0.6 u + 0.8 w (u, w orthonormal) at lr = 0.5 under squared error make S = I - 2 lr H H^T
    a matrix with zero diagonal and 2 x 2 blocks [[0, -0.6], [-0.6, 0]] (well conditioned): its LU factorisation
    must swap the rows of every block, and the rows of X differ, so the solve must apply the pivots' interchanges
    (a smooth S would factor without any)."""
    D_, d_, m = 211, 131, 113
    rng = np.random.default_rng(5)
    W0 = rng.uniform(-1, 1, (D_, d_)) / np.sqrt(d_)
    layer = st.FactoredOutput(W0, loss="squared_error")
    dense = DenseSGD(W0)
    pairs = m // 2
    basis = np.linalg.qr(rng.standard_normal((d_, 2 * pairs + 1)))[0].T  # orthonormal rows
    u, w = basis[:pairs], basis[pairs:2 * pairs]
    H = np.empty((m, d_))
    H[0:2 * pairs:2], H[1:2 * pairs:2], H[-1] = u, 0.6 * u + 0.8 * w, 0.1 * basis[-1]
    S = np.eye(m) - H @ H.T
    assert np.allclose(np.diag(S)[:m - 1], 0) and np.linalg.cond(S) < 2
    for step in range(3):
        targets = rng.integers(0, D_, m)
        Y, mask = dense_targets(targets, m, D_)
        L_ref, g_ref = dense.step(H, Y, "squared_error", {}, 0.5, 0.0, mask)
        L, g = layer.step(H, targets, 0.5)
        assert rel_err(L, L_ref) < 1e-10 and rel_err(g, g_ref) < 1e-10, step
        H = rng.standard_normal((m, d_)) / np.sqrt(d_)
    assert rel_err(layer.dense_weight(), dense.W) < 1e-10


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 70, 97])  # around the 32-row blocks of the substitution
def test_small_system_inverse_matches_numpy(dtype, n):
    """The inverse the step takes of its small systems (getrf, then the blocked substitution applied to the identity)
    against NumPy, for a matrix whose rows are permuted so that getrf must swap them; its rcond estimate brackets the
    true one; with two equal rows, rcond is below the dtype's epsilon (0 where a pivot comes out exactly zero)."""
    from sparsetarget import _core

    rng = np.random.default_rng(n)
    a = (np.eye(n) + 0.3 * rng.standard_normal((n, n)) / np.sqrt(n))[rng.permutation(n)]
    a = a.astype(dtype)
    inverse, rcond = _core._inverse(a)
    a64 = a.astype(np.float64)
    want = np.linalg.inv(a64)
    assert inverse.dtype == dtype
    assert np.abs(inverse - want).max() / np.abs(want).max() < (1e-13 if dtype == np.float64 else 2e-5)
    true_rcond = 1 / (np.abs(a64).sum(1).max() * np.abs(want).sum(1).max())  # infinity norms
    assert true_rcond * 0.999 <= rcond <= 10 * true_rcond
    if n > 1:
        a[-1] = a[0]
        assert _core._inverse(a)[1] < np.finfo(dtype).eps


def dense_float32_error(loss, opts, kind, m, weight_decay):
    """The error of a plain dense float32 SGD run against float64: the yardstick for float32 tolerances."""
    rng = np.random.default_rng(0)
    W0 = (rng.uniform(-1, 1, (D, d)) / np.sqrt(d)).astype(np.float32)
    d64, d32 = DenseSGD(W0.astype(np.float64)), DenseSGD(W0, dtype=np.float32)
    worst = 0.0
    for _ in range(STEPS):
        H = rng.standard_normal((m, d)) / np.sqrt(d)
        targets = make_targets(kind, m, D, rng)
        Y, mask = dense_targets(targets, m, D)
        L64, g64 = d64.step(H, Y, loss, opts, 0.05, weight_decay, mask)
        L32, g32 = d32.step_with(H.astype(np.float32), lambda O, Y=Y: tuple(
            x.astype(np.float32) for x in dense_loss(loss, O.astype(np.float32), Y.astype(np.float32), opts)),
            0.05, weight_decay, mask)
        worst = max(worst, rel_err(L32, L64), rel_err(g32, g64))
    return max(worst, rel_err(d32.W, d64.W))


@pytest.mark.parametrize("state_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["class", "csr"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_float32_weights_within_same_precision_dense_error(loss, kind, state_dtype):
    # Tolerance from the same-precision dense run: plain float32 SGD on W is off the float64 reference by
    # ~3e-7 here, and the factored float32 run measured within 1.3x of that; we allow 4x.
    m, wd = 7, 0.1
    yardstick = dense_float32_error(loss, LOSSES[loss], kind, m, wd)
    errs, _, _ = run_pair(loss, LOSSES[loss], kind, m, wd, dtype=np.float32, state_dtype=state_dtype)
    tol = 4 * yardstick
    assert errs["loss"] < tol and errs["grad_H"] < tol and errs["W"] < tol, (errs, yardstick)


def test_float64_weights_float32_state():
    errs, _, _ = run_pair("spherical_softmax", LOSSES["spherical_softmax"], "class", 9, 0.1, state_dtype=np.float32)
    assert max(errs.values()) < 1e-4, errs
    assert max(errs.values()) > 1e-12  # it really ran in float32


@pytest.mark.parametrize("kind", ["csr", "class_ignore"])
@pytest.mark.parametrize("m", [1, 6, 31])
def test_generic_family_custom_derivatives(m, kind):
    """A loss of (A, q, s) computed by the caller: L = sum_k y_k A_k^3 / 3 + q^2 / 50 + sin(s). With class labels,
    the ignore_index rows' dA, dq, ds are not used (here non-zero, NaN in dA): those rows get no gradient and move
    nothing, as dense SGD with the rows masked out."""
    rng = np.random.default_rng(7)
    W0 = rng.uniform(-1, 1, (D, d)) / np.sqrt(d)
    layer = st.FactoredOutput(W0)
    dense = DenseSGD(W0)
    for step in range(STEPS):
        H = rng.standard_normal((m, d)) / np.sqrt(d)
        targets = make_targets(kind, m, D, rng)  # class_ignore: rows 0, 3, 6, ... ignored (m = 1: the only row)
        if kind == "class_ignore" and step == STEPS - 1 and m > 2:
            targets[1] = targets[2] = int(rng.integers(0, D))  # a class twice among the rows that count
        Y, mask = dense_targets(targets, m, D)

        def custom(O, Y=Y):
            q, s = (O**2).sum(1), O.sum(1)
            L = (Y * O**3).sum(1) / 3 + q**2 / 50 + np.sin(s)
            return L, Y * O**2 + (2 * q / 50)[:, None] * 2 * O + np.cos(s)[:, None]

        _, g_ref = dense.step_with(H, custom, 0.05, 0.02, mask)
        A, q, s = layer.forward(H, targets)
        if kind == "csr":
            dA = np.asarray(targets.data) * A**2
        else:
            ignored = targets == -100
            dA = np.where(ignored, np.nan, A**2)
        g = layer.backward_step(H, targets, dA, 2 * q / 50, np.cos(s), 0.05, 0.02)
        if kind == "class_ignore":
            assert np.all(g[ignored] == 0)
        assert rel_err(g, g_ref) < 1e-10
    assert rel_err(layer.dense_weight(), dense.W) < 1e-10


def test_forward_quantities_and_loss_match_dense(rng):
    W0 = rng.standard_normal((D, d))
    layer = st.FactoredOutput(W0, loss="taylor_softmax")
    H = rng.standard_normal((8, d))
    labels = make_targets("class_ignore", 8, D, rng)
    A, q, s = layer.forward(H, labels)
    O = H @ W0.T
    keep = labels != -100
    assert np.all(A[~keep] == 0)  # ignored rows: 0, as in the torch front end
    assert rel_err(A[keep], O[keep, labels[keep]]) < 1e-12
    assert rel_err(q, (O**2).sum(1)) < 1e-12 and rel_err(s, O.sum(1)) < 1e-12
    Y, mask = dense_targets(labels, 8, D)
    L_ref = np.where(mask, dense_loss("taylor_softmax", O, Y, {})[0], 0)
    before = layer.state_dict()
    assert rel_err(layer.loss(H, labels), L_ref) < 1e-12
    assert np.array_equal(layer.state_dict()["V"], before["V"])


def test_dense_reference_gradients_match_finite_differences(rng):
    """The reference itself is checked: its dL/dO against central differences, for every loss."""
    O = rng.standard_normal((2, 9))
    Y = np.zeros((2, 9))
    Y[0, 3], Y[1, 1], Y[1, 5] = 1.0, 0.5, 2.0
    for name, opts in LOSSES.items():
        _, dO = dense_loss(name, O, Y, opts)
        num = np.zeros_like(O)
        for idx in np.ndindex(*O.shape):
            e = np.zeros_like(O)
            e[idx] = 1e-6
            num[idx] = (dense_loss(name, O + e, Y, opts)[0].sum() - dense_loss(name, O - e, Y, opts)[0].sum()) / 2e-6
        assert np.abs(num - dO).max() < 1e-6, name


def test_scipy_csr_with_duplicates_is_summed(rng):
    sp = pytest.importorskip("scipy.sparse")
    W0 = rng.standard_normal((D, d)) / np.sqrt(d)
    H = rng.standard_normal((3, d)) / np.sqrt(d)
    dup = sp.csr_matrix((np.array([0.5, 0.25, 1.0]), np.array([4, 4, 9]), np.array([0, 2, 2, 3])), shape=(3, D))
    summed = sp.csr_matrix((np.array([0.75, 1.0]), np.array([4, 9]), np.array([0, 1, 1, 2])), shape=(3, D))
    a = st.FactoredOutput(W0, loss="squared_error")
    b = st.FactoredOutput(W0, loss="squared_error")
    La, ga = a.step(H, dup, 0.1)
    Lb, gb = b.step(H, summed, 0.1)
    assert rel_err(La, Lb) < 1e-13 and rel_err(ga, gb) < 1e-13
    assert rel_err(a.dense_weight(), b.dense_weight()) < 1e-13


def test_scipy_csc_targets_are_read_by_rows(rng):
    """A CSC matrix carries indptr, indices and data too, over columns: it must be converted, never read as CSR
    (with m = D its arrays would pass every check and give the transposed targets)."""
    sp = pytest.importorskip("scipy.sparse")
    m = 9
    W0 = rng.standard_normal((m, d)) / np.sqrt(d)  # D = m
    H = rng.standard_normal((m, d)) / np.sqrt(d)
    dense_y = np.zeros((m, m))
    dense_y[np.arange(m), (3 * np.arange(m) + 1) % m] = 1.0
    dense_y[2, 5] = 0.5
    Y, _ = dense_targets(sp.csr_matrix(dense_y), m, m)
    L_ref, g_ref = DenseSGD(W0).step(H, Y, "squared_error", {}, 0.1)
    for targets in (sp.csc_matrix(dense_y), sp.csr_matrix(dense_y)):
        L, g = st.FactoredOutput(W0, loss="squared_error").step(H, targets, 0.1)
        assert rel_err(L, L_ref) < 1e-12 and rel_err(g, g_ref) < 1e-12


@pytest.mark.parametrize("m", [1, 6, 12, 31])  # stacked with 4 rows: Woodbury, Woodbury, explicit, Gram-free
def test_split_backward_with_kept_projections(m):
    """The core's split path used by front ends that record a gradient now and step later: forward keeping the
    projections, grad_hidden (no state change), then backward_step on two stacked minibatches with their stacked
    projections equals dense SGD on their summed gradient."""
    rng = np.random.default_rng(11)
    W0 = rng.uniform(-1, 1, (D, d)) / np.sqrt(d)
    layer = st.FactoredOutput(W0)
    core = layer._engine.core
    dense = DenseSGD(W0)
    parts, grads = [], []
    for rows in (m, 4):
        H = rng.standard_normal((rows, d)) / np.sqrt(d)
        t = st._targets.to_csr(make_targets("csr", rows, D, rng), rows, D, -100)
        A, q, s, proj = core.forward(H, t.indptr, t.indices, True)
        # L = sum_k y_k A_k^2 / 2 + q / 7 + s^2 / 2
        dA, dq, ds = t.values * A, np.full(rows, 1 / 7), s
        before = layer.state_dict()
        g = core.grad_hidden(H, t.indptr, t.indices, dA, dq, ds, proj)
        assert all(np.array_equal(before[k], v) for k, v in layer.state_dict().items() if k != "config")
        assert np.array_equal(g, core.grad_hidden(H, t.indptr, t.indices, dA, dq, ds))
        Y, _ = dense_targets(CSR(t.indptr, t.indices, t.values, (rows, D)), rows, D)
        O = H @ W0.T
        dO = Y * O + (2 / 7) * O + O.sum(1)[:, None]
        assert rel_err(g, dO @ W0) < 1e-10
        grads.append(g)
        parts.append((H, t, dA, dq, ds, proj, dO))
    (H1, t1, dA1, dq1, ds1, p1, dO1), (H2, t2, dA2, dq2, ds2, p2, dO2) = parts
    H = np.vstack([H1, H2])
    indptr = np.concatenate([t1.indptr, t2.indptr[1:] + t1.indptr[-1]])
    stacked = [np.concatenate([a, b]) for a, b in zip(p1, p2)]
    args = (H, indptr, np.concatenate([t1.indices, t2.indices]), np.concatenate([dA1, dA2]),
            np.concatenate([dq1, dq2]), np.concatenate([ds1, ds2]), 0.05, 0.1, tuple(stacked))
    known = np.vstack([g for g in grads])
    twin = st.FactoredOutput(W0)
    twin.load_state_dict(layer.state_dict())
    core.backward_step(*args)
    bad = known.copy()
    bad[1, 2] = np.nan
    state = twin.state_dict()
    with pytest.raises(ValueError, match="grad_H contains NaN or inf"):
        twin._engine.core.backward_step(*args, bad)
    assert all(np.array_equal(state[k], v) for k, v in twin.state_dict().items() if k != "config")
    given = known.copy()
    # reusing grad_H from grad_hidden skips recomputing it; the step only reads it and returns it as given
    out = twin._engine.core.backward_step(*args, known)
    assert out is known and np.array_equal(known, given)
    other = st.FactoredOutput(W0)  # a grad_H unlike the one the step would compute is not overwritten either
    other.load_state_dict(state)
    wrong = 2 * known
    other._engine.core.backward_step(*args, wrong)
    assert np.array_equal(wrong, 2 * given)
    dense.W = (1 - 0.05 * 0.1) * dense.W - 0.05 * (dO1.T @ H1 + dO2.T @ H2)
    assert rel_err(layer.dense_weight(), dense.W) < 1e-10
    assert rel_err(twin.dense_weight(), dense.W) < 1e-10
    with pytest.raises(ValueError, match="grad_H can only be reused"):
        core.backward_step(*args[:-1], None, known)
    with pytest.raises(TypeError, match="projections must be"):
        core.grad_hidden(H1, t1.indptr, t1.indices, dA1, dq1, ds1, (p1[0],))
    with pytest.raises(ValueError, match="projections UH"):
        core.grad_hidden(H1, t1.indptr, t1.indices, dA1, dq1, ds1, (p2[0], *p1[1:]))




def test_large_minibatch_forms_no_m_by_m_matrix():
    """m = 6000 rows at d = 8: the m x m Gram matrices would take 2 x 288 MB in float64; the step needs O(m d + d^2)
    and still equals dense SGD (repeated targets, so the sparse overlaps are large)."""
    rng = np.random.default_rng(3)
    Dn, dn, m = 50, 8, 6000
    W0 = rng.uniform(-1, 1, (Dn, dn)) / np.sqrt(dn)
    layer = st.FactoredOutput(W0, loss="spherical_softmax")
    dense = DenseSGD(W0)
    H = rng.standard_normal((m, dn)) / np.sqrt(dn)
    y = rng.integers(0, Dn, m)
    Y, _ = dense_targets(y, m, Dn)
    L_ref, g_ref = dense.step(H, Y, "spherical_softmax", {}, 1e-4)
    L, g = layer.step(H, y, 1e-4)
    assert rel_err(L, L_ref) < 1e-10 and rel_err(g, g_ref) < 1e-10
    W = layer.dense_weight()
    assert rel_err(W, dense.W) < 1e-10
    sd = layer.state_dict()
    assert rel_err(sd["Q"], W.T @ W) < 1e-10 and np.array_equal(sd["Q"], sd["Q"].T)
    # the peak memory of the same step in a fresh process: no m x m matrix
    code = """
import numpy as np, sparsetarget as st
def peak():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
rng = np.random.default_rng(3)
layer = st.FactoredOutput(rng.uniform(-1, 1, (50, 8)), loss="spherical_softmax")
H, y = rng.standard_normal((6000, 8)), rng.integers(0, 50, 6000)
layer.step(H[:10], y[:10], 1e-4)
before = peak()
layer.step(H, y, 1e-4)
print(peak() - before)
"""
    grew = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grew < 100, f"the step's peak memory grew by {grew:.0f} MiB"


@pytest.mark.parametrize("state_dtype", [np.float32, np.float64])
def test_usual_step_arguments_train_as_every_other_form(state_dtype, monkeypatch):
    """A contiguous H in the state dtype with int64 labels (m,), the usual step, skips the general conversions;
    other forms of the same values (Fortran-order or strided H, H in float64 holding float32 values, int32 or list
    labels) take them and give bit-identical losses, gradients and weights over three steps."""
    import sparsetarget._targets as targets_module

    general = []  # calls of the general conversion's first probe
    probe = targets_module.is_csr_like
    monkeypatch.setattr(targets_module, "is_csr_like", lambda t: general.append(1) or probe(t))
    rng = np.random.default_rng(11)
    W = rng.uniform(-0.3, 0.3, (37, 7))
    H = rng.standard_normal((5, 7)).astype(state_dtype)
    y = np.array([3, -100, 36, 3, 0])
    ref = st.FactoredOutput(W, state_dtype=state_dtype, loss="spherical_softmax")
    expected = [ref.step(H, y, 0.2, 0.01) for _ in range(3)]
    assert not general  # the usual arguments did not take the general target conversion
    forms = [(np.asfortranarray(H), y), (np.repeat(H, 2, axis=0)[::2], y), (H, y.astype(np.int32)), (H, y.tolist())]
    if state_dtype == np.float32:
        forms.append((H.astype(np.float64), y))
    for Hf, yf in forms:
        layer = st.FactoredOutput(W, state_dtype=state_dtype, loss="spherical_softmax")
        for losses0, grad0 in expected:
            losses, grad = layer.step(Hf, yf, 0.2, 0.01)
            assert np.array_equal(losses, losses0) and np.array_equal(grad.astype(grad0.dtype), grad0)
        assert np.array_equal(layer.dense_weight(), ref.dense_weight())
    assert len(general) == 6  # int32 and list labels, three steps each
