"""What a new user sees: cuda_status() on machines without a driver, with an old driver or with a GPU and a CPU-only
build; the configure step's reason for a CPU-only build; the exception's docstring; the demo's checked claims."""

from __future__ import annotations

import ctypes
import os
import types

import pytest
import sparsetarget as st
from sparsetarget import _engine

INSUFFICIENT = "no usable CUDA device: CUDA driver version is insufficient for CUDA runtime version"


def fake_cuda(status: tuple[bool, str] = (False, INSUFFICIENT), runtime: int = 13000) -> types.SimpleNamespace:
    """A stand-in for the compiled sparsetarget._cuda: what its device_status() and runtime_version() answer."""
    return types.SimpleNamespace(device_status=lambda: status, runtime_version=lambda: runtime)


class FakeLibcuda:
    """A stand-in for libcuda.so.1 (the NVIDIA driver) supporting CUDA `version`."""

    def __init__(self, version: int) -> None:
        self.version = version

    def cuDriverGetVersion(self, out: ctypes._CArgObject) -> int:  # noqa: N802 (the driver API's name)
        out._obj.value = self.version
        return 0


def test_no_driver_is_not_reported_as_an_old_driver(monkeypatch):
    # cudaGetDeviceCount answers cudaErrorInsufficientDriver when libcuda is missing altogether
    monkeypatch.setattr(_engine, "cuda_module", lambda: fake_cuda())
    monkeypatch.setattr(_engine, "_libcuda", lambda: None)
    usable, reason = st.cuda_status()
    assert not usable
    assert reason.startswith("no NVIDIA driver is installed") and "insufficient" not in reason


def test_old_driver_names_both_versions_and_the_fix(monkeypatch):
    monkeypatch.setattr(_engine, "cuda_module", lambda: fake_cuda(runtime=13000))
    monkeypatch.setattr(_engine, "_libcuda", lambda: FakeLibcuda(12040))
    usable, reason = st.cuda_status()
    assert not usable
    assert "supports CUDA 12.4" in reason and "CUDA 13.0 runtime" in reason and "update the NVIDIA driver" in reason


def test_other_device_errors_pass_through(monkeypatch):
    monkeypatch.setattr(_engine, "cuda_module", lambda: fake_cuda(status=(False, "no CUDA device is visible")))
    monkeypatch.setattr(_engine, "_libcuda", lambda: FakeLibcuda(13000))
    assert st.cuda_status() == (False, "no CUDA device is visible")
    monkeypatch.setattr(_engine, "cuda_module", lambda: fake_cuda(status=(True, "1 CUDA device(s)")))
    assert st.cuda_status() == (True, "1 CUDA device(s)")


def test_gpu_visible_but_cpu_only_build_says_so_and_why(monkeypatch):
    monkeypatch.setattr(_engine, "_cuda_compiled", lambda: False)
    monkeypatch.setattr(_engine, "_cuda_note", lambda: "no CUDA compiler (nvcc) was found")
    monkeypatch.setattr(_engine, "_visible_gpus", lambda: 2)
    usable, reason = st.cuda_status()
    assert not usable
    assert reason.startswith("2 NVIDIA GPU(s) are visible, but this sparsetarget was compiled without CUDA")
    assert "(no CUDA compiler (nvcc) was found)" in reason and "pip install -v" in reason
    with pytest.raises(RuntimeError, match="2 NVIDIA GPU"):
        _engine.cuda_module()
    monkeypatch.setattr(_engine, "_visible_gpus", lambda: 0)  # no GPU: no advice about a GPU
    usable, reason = st.cuda_status()
    assert reason.startswith("sparsetarget was compiled without CUDA (no CUDA compiler")


def test_this_machine_status_is_consistent():
    usable, reason = st.cuda_status()
    assert _engine._visible_gpus() == (len(os.listdir("/proc/driver/nvidia/gpus"))
                                  if os.path.isdir("/proc/driver/nvidia/gpus") else 0)
    if not os.path.exists("/dev/nvidiactl") and _engine._libcuda() is None:
        assert not usable and "insufficient" not in reason
        if st.build_info()["cuda"]:
            assert reason.startswith("no NVIDIA driver is installed")


def test_configure_step_records_why_cuda_is_missing():
    note = _engine._cuda_note()
    if st.build_info()["cuda"]:
        assert note == ""
    else:
        assert note, "a CPU-only build must record its reason (cmake/SparsetargetCuda.cmake)"
        assert "; " not in note and not note.endswith(" in")


def test_singular_update_error_has_its_own_docstring():
    doc = st.SingularUpdateError.__doc__ or ""
    assert "singular" in doc and "lr" in doc and "left as it was" in doc
    assert issubclass(st.SingularUpdateError, ValueError)


DEMO_ARGS = ["--steps", "4", "--vocab", "1500", "--hidden", "16", "--batch", "8", "--tokens", "60000",
             "--check-steps", "3"]


def test_demo_checks_what_it_prints(capsys):
    from sparsetarget import demo

    demo.main(DEMO_ARGS)
    out = capsys.readouterr().out
    assert "-> the factored steps are dense SGD up to float32 rounding" in out
    factored = float(out.split("factored layer (float32): weights differ by ")[1].split(",")[0])
    moved = float(out.split("these steps moved W by ")[1].split(")")[0])
    assert factored < 100 * 1.2e-7 and moved > 1e3 * factored


def test_demo_reports_a_step_that_is_not_dense_sgd(monkeypatch, capsys):
    from sparsetarget import demo

    exact_step = demo.dense_step
    monkeypatch.setattr(demo, "dense_step", lambda W, H, y, lr: exact_step(W, H, y, 1.001 * lr))
    with pytest.raises(SystemExit) as stop:
        demo.main(DEMO_ARGS)
    assert stop.value.code == 1 and "-> NOT exact" in capsys.readouterr().out


def test_demo_help_names_the_command_and_defaults(capsys):
    from sparsetarget import demo

    with pytest.raises(SystemExit):
        demo.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m sparsetarget.demo") and "(default: 400)" in out
    with pytest.raises(SystemExit):
        demo.main(["--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
