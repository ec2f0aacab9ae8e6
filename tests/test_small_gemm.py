"""The core's own loops for products with a short side (csrc/cpu/small_gemm_cpu.cpp): every path (row and column
tails, transposes, beta, the two-term SYR2K) against float64 NumPy, at the machine's vector width and at AVX2; and
whole training runs with every product the loops can take routed to them, against dense float64 SGD."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import sparsetarget as st
from conftest import core_thread_count
from sparsetarget import _core

HERE = os.path.dirname(os.path.abspath(__file__))

PRODUCT_SHAPES = [(1, 1, 1), (2, 3, 4), (5, 7, 3), (7, 33, 19), (8, 64, 64), (9, 95, 130), (17, 40, 8), (33, 47, 70),
                  (64, 100, 31), (70, 6, 9)]


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def tolerance(dtype) -> float:
    return 1e-13 if dtype == np.float64 else 2e-5


def check_products(dtype) -> None:
    """_product by the own loops and by the step's choice against float64 NumPy, on every transpose, shape and beta;
    raises on a mismatch."""
    rng = np.random.default_rng(0)
    for m, n, k in PRODUCT_SHAPES:
        for ta in (False, True):
            for tb in (False, True):
                for beta, route in itertools.product((0.0, 1.0, -0.5), ("own", "step")):
                    a = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
                    b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
                    c0 = rng.standard_normal((m, n)).astype(dtype)
                    c = np.full_like(c0, np.nan) if beta == 0 else c0.copy()  # beta = 0 must not read c
                    _core._product(a, b, c, ta, tb, 1.3, beta, route)
                    a64, b64 = a.astype(np.float64), b.astype(np.float64)
                    want = 1.3 * (a64.T if ta else a64) @ (b64.T if tb else b64) + (beta * c0 if beta else 0)
                    scale = 1.3 * np.abs(a64).max() * np.abs(b64).max() * k + abs(beta) * np.abs(c0).max()
                    err = np.abs(c - want).max() / scale
                    assert np.all(np.isfinite(c)) and err < tolerance(dtype), (m, n, k, ta, tb, beta, route, err)


SYR2K_SHAPES = [(1, 1), (5, 3), (17, 8), (40, 33), (70, 5), (129, 12), (37, 1), (64, 2), (129, 2), (3, 2)]


def check_sym_rank2k(dtype, shapes=tuple(SYR2K_SHAPES), routes=("own", "step")) -> None:
    """The own SYR2K loops, and the step's choice ("step": one pass per row of C for k <= 2, as at m = 1 and 2),
    against float64 NumPy: both triangles (the lower one mirrored from the upper one, by whole tiles where they fit),
    exactly symmetric, and C not read when beta = 0."""
    rng = np.random.default_rng(1)
    for n, k in shapes:
        for beta in (0.0, 0.7):
            for route in routes:
                a = rng.standard_normal((k, n)).astype(dtype)
                b = rng.standard_normal((k, n)).astype(dtype)
                c0 = rng.standard_normal((n, n)).astype(dtype)
                c0 = (c0 + c0.T).astype(dtype)
                c = np.full_like(c0, np.nan) if beta == 0 else c0.copy()
                _core._sym_rank2k(a, b, c, -0.9, beta, route)
                a64, b64 = a.astype(np.float64), b.astype(np.float64)
                want = -0.9 * (a64.T @ b64 + b64.T @ a64) + beta * c0
                scale = 0.9 * 2 * np.abs(a64).max() * np.abs(b64).max() * k + beta * np.abs(c0).max()
                assert np.array_equal(c, c.T), (n, k, route)
                assert np.abs(c - want).max() / scale < tolerance(dtype), (n, k, beta, route)


def check_sym_rank2k_no_terms(dtype) -> None:
    """k = 0: C <- beta C exactly, and zeros without reading C when beta = 0."""
    c0 = np.random.default_rng(2).standard_normal((5, 5)).astype(dtype)
    empty = np.zeros((0, 5), dtype)
    for beta in (0.0, 0.7):
        c = np.full_like(c0, np.nan) if beta == 0 else c0.copy()
        _core._sym_rank2k(empty, empty, c, -0.9, beta, "step")
        assert np.array_equal(c, np.zeros_like(c0) if beta == 0 else dtype(beta) * c0), beta


def check_transposed_product_bitwise(dtype) -> None:
    """C = H B^T goes through D = B H^T a group of B's rows at a time, the columns of H^T past the last whole block
    (m not a multiple of the narrowest block: half a vector from 8 elements on) in one zero-padded block for all
    rows; each entry is the same sum in the same order as in H (B^T copied), so the two agree bit for bit."""
    rng = np.random.default_rng(3)
    for m, n, k in [(13, 40, 29), (21, 9, 64), (37, 130, 17), (100, 75, 50), (5, 23, 8), (300, 19, 33), (13, 5, 7)]:
        h = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((n, k)).astype(dtype)
        through_transpose = np.full((m, n), np.nan, dtype)
        direct = np.full((m, n), np.nan, dtype)
        _core._product(h, b, through_transpose, False, True, 0.7, 0.0, "own")
        _core._product(h, b.T.copy(), direct, False, False, 0.7, 0.0, "own")
        assert np.array_equal(through_transpose, direct), (m, n, k)


def check_all() -> None:
    for dtype in (np.float64, np.float32):
        check_products(dtype)
        check_sym_rank2k(dtype)
        check_sym_rank2k_no_terms(dtype)
        check_transposed_product_bitwise(dtype)


def run_with(env_value: str, code: str, **env_vars: str) -> str:
    env = {**os.environ, **env_vars, "SPARSETARGET_SMALL_GEMM": env_value, "PYTHONPATH": HERE + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_the_level_follows_the_cpu():
    level = st.build_info()["small_gemm"]
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo here")
    expected = "avx512" if {"avx512f", "fma"} <= flags else "avx2" if {"avx2", "fma"} <= flags else "off"
    if os.environ.get("SPARSETARGET_SMALL_GEMM"):
        pytest.skip("SPARSETARGET_SMALL_GEMM is set in this environment")
    assert level == expected


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_products_match_numpy(dtype):
    """At the level chosen at load (the plain build where that is "off": the tests' direct calls still run)."""
    check_products(dtype)
    check_sym_rank2k(dtype)
    check_sym_rank2k_no_terms(dtype)
    check_transposed_product_bitwise(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sym_rank2k_split_over_threads(dtype):
    """The step's SYR2K in column blocks over two threads, the second block starting off the 16-column tiles
    (n = 512: column 362), each block mirrored by its own thread."""
    with core_thread_count(2):
        check_sym_rank2k(dtype, shapes=((512, 16), (300, 48)), routes=("step",))


def test_plain_loops_match_numpy():
    out = run_with("off", "import sparsetarget as st, test_small_gemm as t; t.check_all(); "
                          "print(st.build_info()['small_gemm'])")
    assert out.split()[-1] == "off"


def test_avx2_loops_match_numpy():
    if not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("no AVX2 on this CPU")
    out = run_with("avx2", "import sparsetarget as st, test_small_gemm as t; t.check_all(); "
                           "print(st.build_info()['small_gemm'])")
    assert out.split()[-1] == "avx2"


def test_bad_calls_name_the_problem():
    a = np.ones((2, 3))
    with pytest.raises(ValueError, match="route"):
        _core._product(a, a.T.copy(), np.zeros((2, 2)), False, False, 1.0, 0.0, "fast")
    with pytest.raises(ValueError, match="shapes"):
        _core._product(a, a, np.zeros((2, 2)), False, False, 1.0, 0.0, "own")
    with pytest.raises(ValueError, match="one dtype"):
        _core._product(a, a.T.astype(np.float32), np.zeros((2, 2)), False, False, 1.0, 0.0, "own")


TRAIN = """
import numpy as np, sparsetarget as st
from reference import DenseSGD, dense_targets, rel_err
assert st.build_info()["small_gemm"] == {level!r}
worst = 0.0
for D, d, m, state, threads in [(301, 37, 1, np.float64, 1), (301, 37, 3, np.float64, 1), (997, 64, 8, np.float64, 1),
                                (997, 64, 40, np.float64, 1), (613, 48, 70, np.float64, 1),
                                (997, 64, 17, np.float32, 1), (1999, 256, 70, np.float64, 2)]:  # 2: products split
    st.set_num_threads(threads)
    rng = np.random.default_rng(d + m)
    W0 = rng.standard_normal((D, d)) / np.sqrt(d)
    layer = st.FactoredOutput(W0, loss="spherical_softmax", state_dtype=state)
    dense = DenseSGD(W0)
    errors = []
    for _ in range(3):
        H = rng.standard_normal((m, d)) / np.sqrt(d)
        y = rng.integers(0, D, m)
        y[: m // 2] = y[0]  # duplicate targets
        L_ref, g_ref = dense.step(H, dense_targets(y, m, D)[0], "spherical_softmax", {{}}, 0.1, 1e-3)
        L, g = layer.step(H, y, 0.1, 1e-3)
        errors += [rel_err(L, L_ref), rel_err(g, g_ref)]
    sd = layer.state_dict()
    W = layer.dense_weight()
    assert np.array_equal(sd["Q"], sd["Q"].T)
    errors += [rel_err(W, dense.W), rel_err(sd["Q"], W.T @ W)]
    assert np.all(np.isfinite(errors)), errors
    worst = max(worst, max(errors) * (1e-6 if state == np.float32 else 1.0))  # float32: within 1e-4
print(worst)
"""


@pytest.mark.parametrize("words,level", [("always", "avx512"), ("avx2,always", "avx2")])
def test_training_with_every_product_on_the_own_loops(words, level):
    """Every product of the step that the loops can compute goes to them (also rank-k updates and long sides)."""
    flags = cpu_flags()
    if not ({"avx512f", "fma"} if level == "avx512" else {"avx2", "fma"}) <= flags:
        pytest.skip(f"no {level} on this CPU")
    worst = float(run_with(words, TRAIN.format(level=level)).split()[-1])
    assert worst < 1e-10  # float64 states; float32 ones scaled by 1e-6


POLICY = """
import numpy as np, sparsetarget as st
from sparsetarget import _core
info = st.build_info()
rng = np.random.default_rng(3)
a, b = rng.standard_normal((64, 300)).astype(np.float32), rng.standard_normal((64, 300)).astype(np.float32)
c0 = rng.standard_normal((300, 300)).astype(np.float32)
out = {}
for route in ("vendor", "own", "step"):
    c = c0.copy()
    _core._product(a, b, c, True, False, 0.7, 0.5, route)  # a rank-64 update of a 300 x 300 matrix
    out[route] = c
print(info["blas_kernel"], "|", info["small_gemm_scope"], "|", np.array_equal(out["step"], out["own"]),
      np.array_equal(out["step"], out["vendor"]))
"""


def test_openblas_names_its_kernel():
    info = st.build_info()
    if "openblas" not in info["blas"].lower():
        pytest.skip(f"not OpenBLAS: {info['blas']}")
    assert info["blas_kernel"] and info["blas_kernel"] != "Unknown", info


@pytest.mark.parametrize("kernel, scope, own", [
    ("Haswell", "up to 1024 (float32) or 512 (float64) on every side", True), ("SkylakeX", "a short side", False)])
def test_products_go_to_the_loops_where_the_vendor_kernel_is_narrower(kernel, scope, own):
    """With AVX-512 loops, an OpenBLAS running its AVX2 (Haswell) kernels hands the step's rank-k updates to the own
    loops too; with its AVX-512 (SkylakeX) kernels it keeps them. Told apart by the rounding of the step's route: the
    two routes sum in different orders or round alpha and beta differently (alpha 0.7 and beta 0.5, not 1 and 0)."""
    if st.build_info()["small_gemm"] != "avx512" or os.environ.get("SPARSETARGET_SMALL_GEMM"):
        pytest.skip("the own loops are not at AVX-512 here, or SPARSETARGET_SMALL_GEMM is set")
    if "openblas" not in st.build_info()["blas"].lower():
        pytest.skip("not OpenBLAS: OPENBLAS_CORETYPE cannot choose the kernel")
    out = run_with("", POLICY, OPENBLAS_CORETYPE=kernel)  # no words: the loops' choice at load
    name, got_scope, flags = (part.strip() for part in out.strip().split("|"))
    if name.lower() != kernel.lower():
        pytest.skip(f"this OpenBLAS does not take OPENBLAS_CORETYPE={kernel} (it runs {name})")
    assert got_scope == scope, out
    same_as_own, same_as_vendor = flags.split()
    assert same_as_own == str(own) and same_as_vendor == str(not own), out
