"""The core's own threads: products split over several threads give the dense reference's results, refreshes and
corrections too, two layers stepping at once from two Python threads stay exact, and a forked child still works."""

import multiprocessing
import threading

import numpy as np
import pytest
import sparsetarget as st
from conftest import core_thread_count
from reference import LOSSES, DenseSGD, dense_targets, rel_err


@pytest.fixture
def two_threads():
    with core_thread_count(2):
        yield


def train_against_dense(loss, D, d, m, steps, seed, weight_decay=1e-3):
    """Steps at sizes where every d x d product is split; returns the largest relative error seen."""
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((D, d)) / np.sqrt(d)
    layer = st.FactoredOutput(W0, loss=loss, **LOSSES[loss])
    dense = DenseSGD(W0)
    worst = 0.0
    for _ in range(steps):
        H = rng.standard_normal((m, d)) / np.sqrt(d)
        y = rng.integers(0, D, m)
        y[:7] = y[7]  # duplicate targets across rows
        Y, _ = dense_targets(y, m, D)
        L_ref, g_ref = dense.step(H, Y, loss, LOSSES[loss], 0.05, weight_decay)
        L, g = layer.step(H, y, 0.05, weight_decay)
        worst = max(worst, rel_err(L, L_ref), rel_err(g, g_ref))
    W = layer.dense_weight()
    sd = layer.state_dict()
    worst = max(worst, rel_err(W, dense.W), rel_err(sd["Q"], W.T @ W), rel_err(sd["w_bar"], W.sum(0)))
    assert np.array_equal(sd["Q"], sd["Q"].T)
    return worst, layer


@pytest.mark.parametrize("loss", list(LOSSES))
# Woodbury (m < d), explicit with the Gram matrix (d <= m < 2d) and explicit Gram-free (m >= 2d) steps
@pytest.mark.parametrize("d,m", [(256, 201), (160, 251), (128, 301)])
def test_split_products_match_dense_sgd(two_threads, loss, d, m):
    assert 2.0 * m * d * d >= 8e6  # large enough to be split over two threads
    assert m >= d or 1.0 * m * m * d >= 8e6  # Woodbury: H H^T (SYRK in column blocks) is split too
    worst, _ = train_against_dense(loss, 1999, d, m, 3, seed=d + m)
    assert worst < 1e-10


def test_split_refresh_and_correction_keep_W(two_threads):
    rng = np.random.default_rng(4)
    D, d = 5003, 96  # refresh tiles of 2048 rows, split in two
    layer = st.FactoredOutput(rng.standard_normal((D, d)) / np.sqrt(d), loss="squared_error")
    P, _ = np.linalg.qr(rng.standard_normal((d, d)))
    R, _ = np.linalg.qr(rng.standard_normal((d, d)))
    U = (P * np.geomspace(0.01, 100, d)) @ R.T
    W = layer.dense_weight()
    sd = layer.state_dict()
    sd["V"] = np.ascontiguousarray(W @ np.linalg.inv(U))
    sd["U"], sd["U_inv"] = U, np.linalg.inv(U)
    layer.load_state_dict(sd)
    report = layer.stabilize()
    assert report["corrected"] and report["values_corrected"] > 0
    layer.refresh()
    sd = layer.state_dict()
    assert rel_err(layer.dense_weight(), W) < 1e-10
    assert rel_err(sd["Q"], W.T @ W) < 1e-11 and rel_err(sd["w_bar"], W.sum(0)) < 1e-11


def test_split_and_unsplit_agree_to_rounding():
    before = st.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            st.set_num_threads(threads)
            results.append(train_against_dense("spherical_softmax", 1999, 256, 201, 2, seed=9)[1].dense_weight())
    finally:
        st.set_num_threads(before)
    assert rel_err(results[1], results[0]) < 1e-13


def test_two_python_threads_stepping_two_layers_at_once(two_threads):
    errors = []

    def run(seed):
        try:
            errors.append(train_against_dense("taylor_softmax", 1499, 256, 151, 3, seed=seed)[0])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 2 and all(isinstance(e, float) and e < 1e-10 for e in errors), errors


def _child_step(queue):
    queue.put(train_against_dense("spherical_softmax", 999, 256, 151, 1, seed=3)[0])


def test_forked_child_steps_after_the_parent_used_its_threads(two_threads):
    train_against_dense("spherical_softmax", 999, 256, 151, 1, seed=2)  # the parent's workers exist now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_step, args=(queue,))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0, "the forked child hung or failed"
    assert queue.get(timeout=5) < 1e-10


def test_thread_count_is_checked():
    with pytest.raises(ValueError, match="n must be >= 1"):
        st.set_num_threads(0)


def test_split_sparse_passes_and_column_blocks_match_dense_sgd(two_threads):
    """With d = 250 (not a multiple of 16): multi-label targets with enough entries that the gather and combine passes
    over V's target rows are split (nnz d >= 65536), duplicates within and across rows, a Woodbury step (m < d) large
    enough that H U^-1 is computed in column blocks shared by the threads, and an explicit step (m > d)."""
    from conftest import CSR

    rng = np.random.default_rng(7)
    D, d, per_row = 997, 250, 3
    W0 = rng.standard_normal((D, d)) / np.sqrt(d)
    layer = st.FactoredOutput(W0, loss="spherical_softmax", **LOSSES["spherical_softmax"])
    dense = DenseSGD(W0)
    worst = 0.0
    for m in (151, 263):
        H = rng.standard_normal((m, d)) / np.sqrt(d)
        indices = rng.integers(0, D, (m, per_row))
        indices[:, 1] = indices[:, 0]  # a duplicate within each row
        indices[1:, 2] = indices[0, 2]  # and one across rows
        targets = CSR(np.arange(m + 1) * per_row, indices.ravel(), rng.uniform(0.1, 1.0, m * per_row), (m, D))
        assert targets.indices.size * d >= 65536 and 2.0 * m * d * d >= 8e6
        Y, _ = dense_targets(targets, m, D)
        L_ref, g_ref = dense.step(H, Y, "spherical_softmax", LOSSES["spherical_softmax"], 0.05, 1e-3)
        L, g = layer.step(H, targets, 0.05, 1e-3)
        worst = max(worst, rel_err(L, L_ref), rel_err(g, g_ref))
    worst = max(worst, rel_err(layer.dense_weight(), dense.W))
    assert rel_err(layer.dense_weight(), W0) > 1e-4  # it trained
    assert worst < 1e-10
