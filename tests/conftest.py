import contextlib
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))


class CSR:
    """A minimal CSR container: anything with indptr/indices/data/shape is accepted as targets."""

    def __init__(self, indptr, indices, data, shape):
        self.indptr = np.asarray(indptr)
        self.indices = np.asarray(indices)
        self.data = np.asarray(data)
        self.shape = shape


def make_targets(kind: str, m: int, D: int, rng: np.random.Generator):
    """Targets of a given kind: class labels, labels with ignored rows, or multi-label CSR with duplicates."""
    if kind == "class":
        labels = rng.integers(0, D, m)
        if m > 2:
            labels[1] = labels[0]  # the same class twice in one batch
        return labels
    if kind == "class_ignore":
        labels = rng.integers(0, D, m)
        labels[::3] = -100
        return labels
    if kind == "csr":
        indptr = [0]
        indices, data = [], []
        for j in range(m):
            k = int(rng.integers(0, 4)) if j % 4 else 3
            idx = list(rng.integers(0, D, k))
            if k >= 2:
                idx[1] = idx[0]  # duplicate within the row
            if j > 0 and indices:
                idx.append(indices[0])  # shared with an earlier row
            indices += [int(i) for i in idx]
            data += list(rng.uniform(0.2, 1.0, len(idx)))
            indptr.append(len(indices))
        return CSR(indptr, indices, data, (m, D))
    raise ValueError(kind)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---------------------------------------------------------------------- devices
def cuda_state() -> tuple[bool, bool, str]:
    """(gpu_visible, usable, reason): a GPU torch can see, and whether sparsetarget's CUDA backend runs on it."""
    try:
        import torch
    except ImportError:
        return False, False, "torch is not installed"
    import sparsetarget

    visible = torch.cuda.is_available()
    usable, reason = sparsetarget.cuda_status()
    if usable and not visible:
        usable, reason = False, "torch cannot see a CUDA device (a CPU build of torch?)"
    return visible, usable, reason


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    """Each device the tests run on: the CPU always, a GPU when the CUDA backend can use one (else skipped)."""
    if request.param == "cuda":
        _, usable, reason = cuda_state()
        if not usable:
            pytest.skip(f"CUDA backend not usable: {reason}")
    return request.param


_cuda_outcomes = {"passed": 0, "skipped": 0}


def pytest_runtest_logreport(report):
    if "cuda" in report.keywords and report.when == "call" and report.passed:
        _cuda_outcomes["passed"] += 1
    if "cuda" in report.keywords and report.skipped:
        _cuda_outcomes["skipped"] += 1


def pytest_sessionfinish(session, exitstatus):
    """A run on a machine with a GPU in which no CUDA test ran is a failure, not a quiet pass."""
    visible, _, reason = cuda_state()
    if visible and _cuda_outcomes["skipped"] and not _cuda_outcomes["passed"]:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"FAILED: a GPU is visible but all {_cuda_outcomes['skipped']} CUDA tests were skipped ({reason}); "
            "build sparsetarget with its CUDA backend (see README)", red=True)
        session.exitstatus = 1


@contextlib.contextmanager
def core_thread_count(n: int):
    """The core's products (and its passes over V) on ``n`` threads; on exit both counts, and whether the count was
    chosen, are as before."""
    import sparsetarget as st
    from sparsetarget import _core, _engine

    before = (st.get_num_threads(), _core.get_pass_threads(), _engine._threads_chosen)
    st.set_num_threads(n)
    try:
        yield n
    finally:
        _core.set_num_threads(before[1])  # both counts, then the products' own
        _core.set_num_threads(before[0], passes=False)
        _engine._threads_chosen = before[2]


@pytest.fixture
def core_threads(request):
    """The core on ``request.param`` threads for the test (parametrize indirectly), whatever the machine's default."""
    with core_thread_count(request.param) as n:
        yield n
