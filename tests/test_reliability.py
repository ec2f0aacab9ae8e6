"""No silent corruption: threads, steps that commit entirely or not at all, overflow and wrap-around, pickled
inputs, all-or-nothing and validated checkpoints (atomic against SIGKILL), and scratch memory that is given back.
Every check is against the dense float64 reference or the layer's own invariants (U U^-1 = I, Q = W^T W)."""

from __future__ import annotations

import copy
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import sparsetarget as st
from conftest import CSR
from reference import DenseSGD, dense_loss, dense_targets, rel_err


def snapshot(layer):
    return {k: v for k, v in layer.state_dict().items() if k != "config"}


def assert_unchanged(layer, before):
    after = snapshot(layer)
    for k, v in before.items():
        assert np.array_equal(after[k], v), k


def invariant_errors(layer):
    """(||U U^-1 - I||_F, ||Q - W^T W|| / ||W^T W||, ||w_bar - W^T 1|| / ||W^T 1||) in float64."""
    sd = layer.state_dict()
    W = layer.dense_weight().astype(np.float64)
    U, U_inv = sd["U"].astype(np.float64), sd["U_inv"].astype(np.float64)
    WtW = W.T @ W
    return (np.linalg.norm(U @ U_inv - np.eye(U.shape[0])), np.linalg.norm(sd["Q"] - WtW) / np.linalg.norm(WtW),
            np.linalg.norm(sd["w_bar"] - W.sum(0)) / np.linalg.norm(W.sum(0)))


# ---------------------------------------------------------------------------------------------------- threads
def test_concurrent_steps_equal_a_sequential_run_in_some_order():
    """Two threads step one layer while a third reads it: the result is a sequential run of the same minibatches
    in some order (reconstructed from the losses each step returned), the invariants hold to 1e-10, and every
    snapshot the reader took is one consistent state."""
    D, d, m, steps, lr = 2000, 48, 8, 60, 0.3
    layer = st.FactoredOutput.random(D, d, dtype=np.float64, loss="spherical_softmax", seed=3)
    W0 = layer.dense_weight()
    rngs = [np.random.default_rng(10 + t) for t in range(2)]
    batches = [[(r.standard_normal((m, d)) / np.sqrt(d), r.integers(0, D, m)) for _ in range(steps)] for r in rngs]
    losses: list[list[np.ndarray]] = [[], []]
    snapshots = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)
    done = threading.Event()

    def trainer(t):
        try:
            barrier.wait()
            for H, y in batches[t]:
                losses[t].append(layer.step(H, y, lr)[0])
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    def reader():
        barrier.wait()
        while not done.is_set() and len(snapshots) < 20:
            snapshots.append(layer.state_dict())
            time.sleep(0.001)

    threads = [threading.Thread(target=trainer, args=(t,)) for t in range(2)] + [threading.Thread(target=reader)]
    for th in threads[:2] + threads[2:]:
        th.start()
    for th in threads[:2]:
        th.join()
    done.set()
    threads[2].join()
    assert not errors, errors

    # replay: at each point, the next step applied is the one whose recorded losses match the dense run's
    dense = DenseSGD(W0)
    pos = [0, 0]
    while pos != [steps, steps]:
        matches = []
        for t in range(2):
            if pos[t] < steps:
                H, y = batches[t][pos[t]]
                L, _ = dense_loss("spherical_softmax", H @ dense.W.T, dense_targets(y, m, D)[0], {"eps": 1e-2})
                if rel_err(losses[t][pos[t]], L) < 1e-8:
                    matches.append(t)
        assert matches, f"no sequential order explains the losses after {pos} steps"
        t = matches[0]
        H, y = batches[t][pos[t]]
        dense.step(H, dense_targets(y, m, D)[0], "spherical_softmax", {"eps": 1e-2}, lr)
        pos[t] += 1
    assert rel_err(layer.dense_weight(), dense.W) < 1e-9
    inv, q, w = invariant_errors(layer)
    assert inv < 1e-10 and q < 1e-10 and w < 1e-10, (inv, q, w)
    assert layer.diagnostics()["steps"] == 2 * steps
    for sd in snapshots:  # each snapshot is one state: its Q is W^T W of its own V, U, omega
        W = sd["V"] @ sd["U"] + sd["omega"]
        assert rel_err(sd["Q"], W.T @ W) < 1e-10


# ---------------------------------------------------------------------------------------- all-or-nothing steps
@pytest.mark.parametrize("D, d", [(2000, 32), (30, 4)])
def test_exactly_singular_update_is_refused_even_with_min_rcond_0(D, d):
    layer = st.FactoredOutput.random(D, d, dtype=np.float64, loss="squared_error", min_rcond=0.0)
    h = np.zeros((1, d))
    h[0, 0] = 1.0  # squared error: M = I - lr * 2 e0 e0^T = I - e0 e0^T at lr 0.5, exactly singular
    before = snapshot(layer)
    with pytest.raises(st.SingularUpdateError, match="singular"):
        layer.step(h, np.array([3]), 0.5)
    assert_unchanged(layer, before)
    dense = DenseSGD(layer.dense_weight())
    H = np.random.default_rng(0).standard_normal((3, d))
    layer.step(H, np.array([1, 2, 3]), 0.05)  # the layer still works
    dense.step(H, dense_targets(np.array([1, 2, 3]), 3, D)[0], "squared_error", {}, 0.05)
    assert rel_err(layer.dense_weight(), dense.W) < 1e-12


@pytest.mark.parametrize("core_threads", [1, 2], indirect=True)  # LU factors on one thread, the inverse on two
def test_singular_large_woodbury_system_is_refused(core_threads):
    """m = 113 < d = 131: squared error makes S = I - 2 lr H H^T, singular at
    lr = 1 / (2 lambda_max(H H^T)) and nearly so just below; both are refused with the layer unchanged."""
    D, d, m = 300, 131, 113
    layer = st.FactoredOutput.random(D, d, dtype=np.float64, loss="squared_error")
    rng = np.random.default_rng(3)
    H = rng.standard_normal((m, d)) / np.sqrt(d)
    y = rng.integers(0, D, m)
    lam = np.linalg.eigvalsh(H @ H.T).max()
    before = snapshot(layer)
    for lr in (1 / (2 * lam), (1 - 1e-9) / (2 * lam)):
        with pytest.raises(st.SingularUpdateError, match="singular"):
            layer.step(H, y, lr)
        assert_unchanged(layer, before)
    dense = DenseSGD(layer.dense_weight())
    layer.step(H, y, 0.2 / lam)  # a sane lr still works, exactly
    dense.step(H, dense_targets(y, m, D)[0], "squared_error", {}, 0.2 / lam)
    assert rel_err(layer.dense_weight(), dense.W) < 1e-12


def test_overflow_into_V_is_refused():
    """float32 V with a float64 state: a step whose V update overflows float32 but not float64 is refused."""
    layer = st.FactoredOutput.random(50, 8, dtype=np.float32, state_dtype=np.float64, seed=1)
    H = np.random.default_rng(1).uniform(0.5, 1, (1, 8))
    before = snapshot(layer)
    target = CSR([0, 1], [3], [1e40], (1, 50))
    with pytest.raises(ValueError, match="non-finite values in [VW].*lower lr.*unchanged"):
        layer.step(H, target, 0.1)
    assert_unchanged(layer, before)
    with pytest.raises(ValueError, match="non-finite values in [VW]"):
        layer.backward_step(H, np.array([3]), np.array([1e40]), np.zeros(1), np.zeros(1), 0.1)
    assert_unchanged(layer, before)
    assert np.all(np.isfinite(layer.loss(H, np.array([3]))))


def test_overflow_in_the_V_scatter_is_refused_when_W_fits():
    """U scaled to 1e-37 (allowed: only the spread of U is corrected at once), so V = W U^-1 holds W * 1e37 in
    float32: an update that W absorbs easily would overflow the target's row of V."""
    layer = st.FactoredOutput.random(50, 8, dtype=np.float32, state_dtype=np.float64, seed=2)
    sd = layer.state_dict()
    W = layer.dense_weight().astype(np.float64)
    sd["V"] = (W * 1e37).astype(np.float32)
    sd["U"], sd["U_inv"] = np.eye(8) * 1e-37, np.eye(8) * 1e37
    layer.load_state_dict(sd)
    H = np.full((1, 8), 2.0)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="non-finite values in V.*unchanged"):
        layer.step(H, CSR([0, 1], [3], [1000.0], (1, 50)), 0.1)
    assert_unchanged(layer, before)
    layer.step(H, CSR([0, 1], [3], [1.0], (1, 50)), 1e-3)  # a small step still fits
    assert np.all(np.isfinite(layer.dense_weight()))


def test_overflow_in_the_inverse_update_is_refused():
    """float64 V with a float32 state, U scaled to 1e-36: a short h_1 = 0.01 e_1 at an lr that leaves the step's
    factor well conditioned (S = 1e-3) keeps X = H U_new^-1 ~ 1e37 finite, but U^-1's update, lr alpha h X^T ~ 1e39,
    overflows float32: refused by the bound on the commit's products, with nothing written."""
    layer = st.FactoredOutput.random(30, 4, loss="squared_error", dtype=np.float64, state_dtype=np.float32, seed=3)
    sd = layer.state_dict()
    sd["V"] = layer.dense_weight() * 1e36
    sd["U"], sd["U_inv"] = np.eye(4, dtype=np.float32) * 1e-36, np.eye(4, dtype=np.float32) * 1e36
    layer.load_state_dict(sd)
    H = np.zeros((1, 4))
    H[0, 0] = 0.01
    lr = (1 - 1e-3) / (2 * 0.01**2)  # squared error: alpha = 2, S = 1 - lr alpha ||h||^2 = 1e-3
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"non-finite values in U, Q or U\^-1.*unchanged"):
        layer.step(H, np.array([3]), lr)
    assert_unchanged(layer, before)
    layer.step(H, np.array([3]), 1.0)  # a well-scaled step still fits
    assert all(np.all(np.isfinite(v)) for v in layer.state_dict().values() if isinstance(v, np.ndarray))


@pytest.mark.parametrize("lr, scale", [(3.5e38, 1.0), (1e39, 1.0), (1e30, 1e5)])
def test_huge_lr_raises_a_value_error_naming_lr_not_a_lapack_error(lr, scale):
    layer = st.FactoredOutput.random(40, 6, dtype=np.float32)
    H = np.random.default_rng(2).standard_normal((2, 6)) * scale
    before = snapshot(layer)
    with pytest.raises(ValueError, match="lr") as info:
        layer.step(H, np.array([1, 2]), lr)
    assert "illegal argument" not in str(info.value)
    assert_unchanged(layer, before)


def test_check_every_0_is_refused():
    """Without monitoring nothing looks at U: 40 repeated examples at lr 0.45 took cond(U) to 1e16 silently."""
    with pytest.raises(ValueError, match="check_every must be >= 1"):
        st.FactoredOutput.random(30, 4, check_every=0)
    layer = st.FactoredOutput.random(30, 4)
    with pytest.raises(ValueError, match="check_every"):
        layer.set_stabilization(check_every=0)
    assert layer.config()["check_every"] == st._engine.STABILIZATION_DEFAULTS["check_every"]
    for bad in (1.5, "2", True):
        with pytest.raises(TypeError, match="check_every"):
            layer.set_stabilization(check_every=bad)


def test_repeated_examples_at_large_lr_stay_exact_with_the_default_policy():
    D, d = 60, 6
    layer = st.FactoredOutput.random(D, d, dtype=np.float64, loss="squared_error", seed=4)
    dense = DenseSGD(layer.dense_weight())
    H = np.random.default_rng(4).standard_normal((1, d))
    H /= np.linalg.norm(H)
    for _ in range(40):
        layer.step(H, np.array([5]), 0.45)
        dense.step(H, dense_targets(np.array([5]), 1, D)[0], "squared_error", {}, 0.45)
    assert rel_err(layer.dense_weight(), dense.W) < 1e-10
    assert layer.diagnostics()["condition"] < 10


# ------------------------------------------------------------------------------------------ inputs and scalars
def test_uint64_labels_do_not_wrap_to_ignore_index():
    layer = st.FactoredOutput.random(40, 5, dtype=np.float64)
    H = np.ones((2, 5))
    before = snapshot(layer)
    for labels in (np.array([2**64 - 100, 1], dtype=np.uint64), np.array([2**63, 1], dtype=np.uint64)):
        with pytest.raises(ValueError, match="out of range") as info:
            layer.step(H, labels, 0.1)
        assert "-" not in str(info.value).split("contains")[1].split(",")[0]  # no negative class in the message
        assert_unchanged(layer, before)
    with pytest.raises(ValueError, match="out of range"):
        layer.step(H, CSR([0, 1, 1], np.array([2**64 - 1], dtype=np.uint64), [1.0], (2, 40)), 0.1)
    small = np.array([3, 7], dtype=np.uint64)  # in range: as int64
    twin = copy.deepcopy(layer)
    assert np.array_equal(layer.step(H, small, 0.1)[0], twin.step(H, small.astype(np.int64), 0.1)[0])


def test_arrays_that_went_through_pickle_are_accepted():
    rng = np.random.default_rng(5)
    W = pickle.loads(pickle.dumps(rng.standard_normal((30, 6))))
    layer = st.FactoredOutput(W, copy=False)  # V is the unpickled array itself
    twin = st.FactoredOutput(rng.standard_normal((30, 6)))
    twin.load_state_dict(layer.state_dict())
    H, y = rng.standard_normal((4, 6)), rng.integers(0, 30, 4)
    Hp, yp = pickle.loads(pickle.dumps(H)), pickle.loads(pickle.dumps(y))
    target = CSR(pickle.loads(pickle.dumps(np.array([0, 1, 3, 3, 4]))), pickle.loads(pickle.dumps(y)),
                 np.ones(4), (4, 30))
    assert np.array_equal(layer.step(Hp, yp, 0.1)[1], twin.step(H, y, 0.1)[1])
    assert np.array_equal(layer.step(Hp, target, 0.1)[1], twin.step(H, target, 0.1)[1])
    assert np.array_equal(layer.dense_weight(), twin.dense_weight())


def test_strings_are_refused_as_numbers():
    layer = st.FactoredOutput.random(20, 4)
    H, y = np.ones((1, 4)), np.array([1])
    before = snapshot(layer)
    with pytest.raises(TypeError, match="lr"):
        layer.step(H, y, "0.1")
    with pytest.raises(TypeError, match="weight_decay"):
        layer.step(H, y, 0.1, "1e-4")
    with pytest.raises(TypeError, match="lr"):
        layer.backward_step(H, y, np.ones(1), np.ones(1), np.ones(1), np.array("0.1"))
    assert_unchanged(layer, before)
    threads = st.get_num_threads()
    with pytest.raises(TypeError, match="n must be an int"):
        st.set_num_threads("2")
    with pytest.raises(TypeError, match="n must be an int"):
        st.set_num_threads(2.0)
    assert st.get_num_threads() == threads


def test_malformed_torch_csr_targets_name_target():
    torch = pytest.importorskip("torch")
    import sparsetarget.torch as stt

    head = stt.FactoredLinear(5, 20, dtype=torch.float64)
    x = torch.ones(2, 5, dtype=torch.float64)
    cols, vals = torch.tensor([1, 2, 3]), torch.ones(3, dtype=torch.float64)
    for crow in ([0, 3, 2], [0, 1, 2], [1, 2, 3], [0, 2, 4]):  # decreasing, last != nnz, first != 0
        with pytest.raises(ValueError, match="target"):
            stt.linear_spherical_loss(x, head, (torch.tensor(crow), cols, vals))


# ------------------------------------------------------------------------------------------ copies and state
def test_deepcopy_and_pickle_resume_bit_exactly_and_are_independent():
    rng = np.random.default_rng(6)
    layer = st.FactoredOutput.random(40, 7, loss="taylor_softmax", dtype=np.float32, state_dtype=np.float64,
                                     ignore_index=-1, refresh_every=7, inverse_tol=2e-3)
    layer.step(rng.standard_normal((3, 7)), np.array([1, -1, 5]), 0.1)
    for make_twin in (copy.deepcopy, lambda x: pickle.loads(pickle.dumps(x)), copy.copy):
        twin = make_twin(layer)
        assert twin.config() == layer.config()
        H, y = rng.standard_normal((4, 7)), rng.integers(0, 40, 4)
        before = snapshot(layer)
        a = twin.step(H, y, 0.1)
        assert_unchanged(layer, before)  # the copy has its own arrays
        b = layer.step(H, y, 0.1)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        for k, v in snapshot(layer).items():
            assert np.array_equal(snapshot(twin)[k], v), k


@pytest.mark.parametrize("config, error", [
    ({"sigma_range": [2, 0.5]}, "sigma_range"),
    ({"check_every": -1}, "check_every"),
    ({"check_every": 0}, "check_every"),
    ({"ignore_index": "x"}, "ignore_index"),
    ({"refresh_every": 2.5}, "refresh_every"),
    ({"loss": "hinge"}, "loss"),
    ({"loss_options": {"eps": "0.1"}}, "eps"),
    ({"inverse_tol": float("nan")}, "inverse_tol"),
])
def test_load_state_dict_with_bad_config_changes_nothing(config, error):
    rng = np.random.default_rng(7)
    layer = st.FactoredOutput.random(30, 5, loss="spherical_softmax", seed=1)
    other = st.FactoredOutput.random(30, 5, loss="spherical_softmax", seed=2)
    sd = other.state_dict()
    sd["config"].update(config)
    before, cfg = snapshot(layer), layer.config()
    with pytest.raises((ValueError, TypeError), match=error):
        layer.load_state_dict(sd)
    assert_unchanged(layer, before)
    assert layer.config() == cfg
    layer.step(rng.standard_normal((2, 5)), np.array([1, 2]), 0.1)


def test_load_state_dict_missing_config_key_changes_nothing():
    layer = st.FactoredOutput.random(30, 5)
    sd = layer.state_dict()
    del sd["config"]["check_every"]
    sd["V"] = sd["V"] * 2
    before = snapshot(layer)
    with pytest.raises(ValueError, match="config is missing \\['check_every'\\]"):
        layer.load_state_dict(sd)
    assert_unchanged(layer, before)


def corrupt(sd, what):
    sd = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in sd.items()}
    if what == "nan_V":
        sd["V"][3, 1] = np.nan
    elif what == "inf_U":
        sd["U"][0, 0] = np.inf
    elif what == "U_inv":
        sd["U_inv"] = sd["U_inv"] + 0.05
    elif what == "Q":
        sd["Q"] = sd["Q"] * 1.01
    elif what == "w_bar":
        sd["w_bar"] = sd["w_bar"] + 1.0
    elif what == "V_of_another_state":
        sd["V"] = np.roll(sd["V"], 1, axis=1)
    return sd


BAD_STATES = {"nan_V": "V.*NaN", "inf_U": "U.*NaN or inf", "U_inv": "U_inv.*inverse", "Q": "Q.*W\\^T W",
              "w_bar": "w_bar", "V_of_another_state": "Q.*W\\^T W"}


@pytest.mark.parametrize("what", list(BAD_STATES))
def test_inconsistent_state_is_refused_by_load_state_dict_and_load(what, tmp_path):
    rng = np.random.default_rng(8)
    layer = st.FactoredOutput.random(60, 6, dtype=np.float64, seed=3)
    layer.step(rng.standard_normal((4, 6)), rng.integers(0, 60, 4), 0.2)
    bad = corrupt(layer.state_dict(), what)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=BAD_STATES[what]):
        layer.load_state_dict(bad)
    assert_unchanged(layer, before)
    path = tmp_path / "bad.npz"
    np.savez(path, config=np.array(__import__("json").dumps(bad.pop("config"))), **bad)
    with pytest.raises(ValueError, match=BAD_STATES[what]):
        st.FactoredOutput.load(path)


def test_load_rejects_damaged_and_foreign_files_clearly(tmp_path):
    layer = st.FactoredOutput.random(60, 6, seed=4)
    good = tmp_path / "good.npz"
    layer.save(good)
    (tmp_path / "random.npz").write_bytes(np.random.default_rng(9).bytes(5000))
    with pytest.raises(ValueError, match="not a FactoredOutput file"):
        st.FactoredOutput.load(tmp_path / "random.npz")
    np.save(tmp_path / "one.npy", np.ones(3))
    with pytest.raises(ValueError, match="holds one array"):
        st.FactoredOutput.load(tmp_path / "one.npy")
    sd = layer.state_dict()
    config = np.array(__import__("json").dumps(sd.pop("config")))
    del sd["Q"]
    np.savez(tmp_path / "missing.npz", config=config, **sd)
    with pytest.raises(ValueError, match="missing \\['Q'\\]"):
        st.FactoredOutput.load(tmp_path / "missing.npz")
    data = good.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.npz"):
        st.FactoredOutput.load(tmp_path / "truncated.npz")
    with pytest.raises(FileNotFoundError):
        st.FactoredOutput.load(tmp_path / "absent.npz")


def test_save_replaces_atomically_and_load_resumes_bit_exactly(tmp_path):
    rng = np.random.default_rng(10)
    layer = st.FactoredOutput.random(80, 9, dtype=np.float32, state_dtype=np.float64, loss="z_loss", seed=5)
    path = tmp_path / "layer.npz"
    path.write_bytes(b"an older file")
    os.chmod(path, 0o640)
    layer.step(rng.standard_normal((3, 9)), rng.integers(0, 80, 3), 0.1)
    layer.save(path)
    assert sorted(os.listdir(tmp_path)) == ["layer.npz"]  # no temporary file left
    assert os.stat(path).st_mode & 0o777 == 0o640  # the replaced file's permissions are kept
    loaded = st.FactoredOutput.load(path)
    H, y = rng.standard_normal((5, 9)), rng.integers(0, 80, 5)
    a, b = layer.step(H, y, 0.1), loaded.step(H, y, 0.1)
    assert np.array_equal(a[1], b[1])
    for k, v in snapshot(layer).items():
        assert np.array_equal(snapshot(loaded)[k], v), k


CHILD_SAVE = """
import sys
import numpy as np
import sparsetarget as st
layer = st.FactoredOutput.random(int(sys.argv[2]), 64, dtype=np.float32, seed=1)
print("ready", flush=True)
sys.stdin.readline()
while True:
    layer.save(sys.argv[1])
"""


def test_sigkill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    """A child process saves a 400000 x 64 layer over a checkpoint in a loop and is killed with SIGKILL while a
    save is in progress: the checkpoint at the path is still a complete file that loads."""
    path = tmp_path / "layer.npz"
    previous = st.FactoredOutput.random(5, 3, seed=2)
    previous.save(path)
    with subprocess.Popen([sys.executable, "-c", CHILD_SAVE, str(path), "400000"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}) as child:
        kill_during_save(child, tmp_path)
    loaded = st.FactoredOutput.load(path)  # either the previous checkpoint or a complete new one
    assert loaded.out_features in (5, 400000)
    if loaded.out_features == 5:
        assert np.array_equal(loaded.dense_weight(), previous.dense_weight())


def saving(directory) -> bool:
    """True while a temporary file of more than 1 MB is being written in ``directory``."""
    for name in os.listdir(directory):
        try:
            if name.endswith(".tmp") and os.path.getsize(directory / name) > 1 << 20:
                return True
        except FileNotFoundError:  # renamed in the meantime
            pass
    return False


def kill_during_save(child, directory):
    """Let the child start saving, then SIGKILL it while its temporary file is being written."""
    try:
        assert child.stdout.readline().strip() == "ready"
        child.stdin.write("go\n")
        child.stdin.flush()
        deadline = time.monotonic() + 1.0  # a save of the layer takes longer: a kill by then is mid-save anyway
        while not saving(directory) and time.monotonic() < deadline:
            assert child.poll() is None
            time.sleep(0.002)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# ---------------------------------------------------------------------------------------------------- memory
def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_scratch_of_a_huge_minibatch_is_released():
    """m = 3000 rows: the m x m scratch (G, its products; 72 MB each in float64) is given back after the call."""
    layer = st.FactoredOutput.random(5000, 8, dtype=np.float64, seed=6)
    rng = np.random.default_rng(11)
    small = rng.standard_normal((4, 8)) / 8
    layer.step(small, rng.integers(0, 5000, 4), 0.01)
    base = resident_bytes()
    H = rng.standard_normal((3000, 8)) / 30
    layer.step(H, rng.integers(0, 5000, 3000), 1e-4)
    grown = resident_bytes() - base
    assert grown < 100e6, f"{grown / 1e6:.0f} MB still resident after the step"


# ------------------------------------------------------------------------------- the same checks on the GPU
def cuda_head(dtype: str, state_dtype: str | None = None, **kwargs):
    """(torch, sparsetarget.torch, a FactoredLinear(6, 40) on the GPU); skips without a usable CUDA backend."""
    from conftest import cuda_state

    _, usable, reason = cuda_state()
    if not usable:
        pytest.skip(f"CUDA backend not usable: {reason}")
    import sparsetarget.torch as stt
    import torch

    torch.manual_seed(0)
    sdt = None if state_dtype is None else getattr(torch, state_dtype)
    return torch, stt, stt.FactoredLinear(6, 40, device="cuda", dtype=getattr(torch, dtype), state_dtype=sdt,
                                          **kwargs)


@pytest.mark.cuda
def test_cuda_exactly_singular_update_is_refused_even_with_min_rcond_0():
    torch, stt, head = cuda_head("float64", min_rcond=0.0)
    snap = {name: getattr(head, name).clone() for name in st.layer.STATE_ARRAYS}
    h = torch.zeros(1, 6, dtype=torch.float64, device="cuda")
    h[0, 0] = 1.0  # squared error, sum: M = I - 2 lr e0 e0^T, exactly singular at lr 0.5
    opt = stt.FactoredSGD(head, lr=0.5)
    stt.linear_spherical_loss(h, head, torch.tensor([3], device="cuda"), loss="squared_error",
                              reduction="sum").backward()
    opt.step()
    with pytest.raises(st.SingularUpdateError):
        head.synchronize()
    for name, value in snap.items():
        assert torch.equal(getattr(head, name), value), name


@pytest.mark.cuda
def test_cuda_overflow_into_float32_weights_is_refused():
    torch, stt, head = cuda_head("float32", "float64")
    snap = {name: getattr(head, name).clone() for name in st.layer.STATE_ARRAYS}
    h = torch.full((1, 6), 0.7, dtype=torch.float32, device="cuda")
    target = tuple(t.cuda() for t in (torch.tensor([0, 1]), torch.tensor([3]), torch.tensor([1e38] * 1)))
    opt = stt.FactoredSGD(head, lr=10.0)  # the V update ~ lr * 2e38 * 0.7 overflows float32, not the float64 state
    with pytest.raises(ValueError):  # raised by whichever call sees the device's report
        stt.linear_spherical_loss(h, head, target, loss="squared_error", reduction="sum").backward()
        opt.step()
        head.synchronize()
    for name, value in snap.items():
        assert torch.equal(getattr(head, name), value), name
