"""The engine contract: one module imports the compiled backends, the NumPy API never imports torch, and the
stabilisation defaults are resolved in Python and set explicitly in the core."""

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import sparsetarget as st
from sparsetarget import _engine

PACKAGE = pathlib.Path(st.__file__).parent


def test_only_the_engine_imports_the_compiled_backends():
    pattern = re.compile(r"(import|from)\s+[.\w]*\b_(core|cuda)\b|import_module\(\s*['\"][.\w]*_(core|cuda)\b")
    importers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text()))
    assert importers == ["_engine.py"]


def test_numpy_api_never_imports_torch():
    code = ("import sys, numpy as np, sparsetarget as st\n"
            "layer = st.FactoredOutput.random(30, 4, loss='spherical_softmax')\n"
            "H = np.ones((2, 4), np.float32)\n"
            "layer.step(H, np.array([1, -100]), 0.1); layer.log_prob(H, np.array([1, 2]))\n"
            "layer.topk(H, 3, by='probability'); layer.diagnostics()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("state_dtype", [np.float32, np.float64])
def test_default_policy_is_set_explicitly_in_the_core(state_dtype):
    layer = st.FactoredOutput.random(20, 5, dtype=np.float64, state_dtype=state_dtype)
    core = layer._engine.core
    eps = np.finfo(state_dtype).eps
    assert core.min_rcond == pytest.approx(np.sqrt(eps), rel=1e-12)
    assert (core.sigma_low, core.sigma_high) == ((0.1, 10.0) if state_dtype == np.float32 else (0.2, 5.0))
    assert tuple(cfg_sigma := layer.config()["sigma_range"]) == (core.sigma_low, core.sigma_high), cfg_sigma
    assert core.inverse_tol == _engine.STABILIZATION_DEFAULTS["inverse_tol"]
    assert (core.check_every, core.refresh_every) == (16, -1)  # -1: automatic refresh
    cfg = layer.config()
    assert cfg["min_rcond"] == core.min_rcond
    layer.set_stabilization(min_rcond=1e-3, check_every=None)  # None: unchanged
    assert core.min_rcond == 1e-3 and core.check_every == 16
    sd = layer.state_dict()
    sd["config"]["min_rcond"] = -1.0  # how 0.1 saved the default
    layer.load_state_dict(sd)
    assert core.min_rcond == pytest.approx(np.sqrt(eps), rel=1e-12)


def test_lr_and_weight_decay_checked_by_one_function():
    assert _engine.check_lr(0.5, 1.0) == (0.5, 1.0)
    for lr, wd, exc, match in ((-1, 0, ValueError, "lr"), (0.1, float("nan"), ValueError, "weight_decay"),
                               ("x", 0, TypeError, "lr"), (2.0, 0.5, ValueError, "lr \\* weight_decay")):
        with pytest.raises(exc, match=match):
            _engine.check_lr(lr, wd)
    layer = st.FactoredOutput.random(20, 5)
    H = np.ones((1, 5))
    with pytest.raises(ValueError, match="lr \\* weight_decay"):
        layer.backward_step(H, np.array([1]), np.ones(1), np.ones(1), np.ones(1), 2.0, 0.5)


COMMON_METHODS = ("forward", "grad_hidden", "backward_step", "refresh", "stabilize", "inverse_error", "synchronize",
                  "poll")
COMMON_PROPERTIES = ("D", "d", "stream", "tf32", "min_rcond", "sigma_low", "sigma_high", "inverse_tol", "check_every",
                     "refresh_every")


def _signature_and_doc(method) -> tuple[list[str], str]:
    """Argument names and the docstring body of a pybind11 method (types and module names left out)."""
    head, _, body = method.__doc__.partition("\n")
    return re.findall(r"(\w+):", head.split("(", 1)[1]), body.strip()


@pytest.mark.skipif(not st.build_info()["cuda"], reason="a CPU-only build has no CUDA module to compare")
def test_cpu_and_cuda_cores_bind_the_same_methods():
    cuda = _engine.cuda_module()  # importable without a GPU
    cpu_core, cuda_core = _engine._core.FactoredCore, cuda.FactoredCore
    for name in COMMON_METHODS:
        assert _signature_and_doc(getattr(cpu_core, name)) == _signature_and_doc(getattr(cuda_core, name)), name
    for name in COMMON_PROPERTIES:
        assert getattr(cpu_core, name).__doc__ == getattr(cuda_core, name).__doc__, name
    assert _signature_and_doc(cpu_core.__init__)[0] == _signature_and_doc(cuda_core.__init__)[0]


def test_policy_defaults_come_from_the_core():
    defaults = _engine._core.DEFAULT_STABILIZATION
    assert _engine.STABILIZATION_DEFAULTS["sigma_range"] is None  # resolved by the state dtype
    assert _engine.default_sigma_range(np.float32) == (defaults["sigma_low"], defaults["sigma_high"]) == (0.1, 10.0)
    assert _engine.default_sigma_range(np.float64) == (0.2, 5.0)
    assert _engine.default_min_rcond(np.float32) == pytest.approx(np.sqrt(np.finfo(np.float32).eps), rel=1e-6)
    assert _engine.default_min_rcond(np.float64) == pytest.approx(np.sqrt(np.finfo(np.float64).eps), rel=1e-12)
