"""The build backend (tools/build_backend): when a CUDA build needs the nvidia-cublas wheel, and how it is added to
the build requirements and to the wheel's dependencies. Needs the source tree."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import sys
import zipfile
from pathlib import Path

import pytest

BACKEND_DIR = Path(__file__).resolve().parents[1] / "tools" / "build_backend"
if not (BACKEND_DIR / "sparsetarget_build.py").exists():
    pytest.skip("the source tree's tools/build_backend is not here (tests run against an installed wheel)",
                allow_module_level=True)
sys.path.insert(0, str(BACKEND_DIR))
import sparsetarget_build as backend  # noqa: E402


def make_toolkit(tmp_path: Path, release: str = "13.0", cublas: bool = False) -> Path:
    """A fake CUDA toolkit whose nvcc answers --version and -v --dryrun like the real one, and a wrapper script
    outside it (like /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc). Returns the wrapper's directory."""
    root = tmp_path / f"cuda-{release}"
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n"
                    f'if [ "$1" = "--version" ]; then echo "Cuda compilation tools, release {release}, V{release}.1"; '
                    f'else echo "#\\$ TOP={root}/bin/.." >&2; fi\n')
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    if cublas:
        (root / "targets" / "x86_64-linux" / "lib").mkdir(parents=True)
        (root / "targets" / "x86_64-linux" / "lib" / "libcublas.so.13").write_bytes(b"")
        (root / "include").mkdir()
        (root / "include" / "cublas_v2.h").write_text("")
    wrapper_dir = tmp_path / "wrapper-bin"
    wrapper_dir.mkdir(exist_ok=True)
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return wrapper_dir


def test_cublas_wheel_is_required_only_when_nvcc_has_no_cublas(tmp_path):
    bare = make_toolkit(tmp_path / "a")
    env = {"PATH": f"{bare}{os.pathsep}/usr/bin:/bin"}
    assert backend.cuda_requirements({}, env) == ["nvidia-cublas>=13,<14"]
    assert backend.cuda_requirements({"cmake.define.SPARSETARGET_WITH_CUDA": "OFF"}, env) == []
    assert backend.cuda_requirements({"cmake.define.SPARSETARGET_CUBLAS_ROOT": "/opt/cublas"}, env) == []
    assert backend.cuda_requirements({}, {"PATH": str(tmp_path / "nothing")}) == []
    # the toolkit behind the wrapper has cuBLAS: nothing to add
    assert backend.cuda_requirements({}, {"PATH": str(make_toolkit(tmp_path / "b", cublas=True))}) == []
    # CUDA 12 has its own wheel name; $CUDACXX wins over PATH
    cu12 = make_toolkit(tmp_path / "c", release="12.4") / "nvcc"
    assert backend.cuda_requirements(None, {"PATH": str(tmp_path / "nothing"), "CUDACXX": str(cu12)}) == [
        "nvidia-cublas-cu12>=12,<13"]


def test_build_requirements_add_the_cublas_wheel(monkeypatch):
    pytest.importorskip("scikit_build_core")
    monkeypatch.setattr(backend, "cuda_requirements", lambda config_settings=None: ["nvidia-cublas>=13,<14"])
    assert backend.get_requires_for_build_wheel({})[-1] == "nvidia-cublas>=13,<14"
    assert backend.get_requires_for_build_editable({})[-1] == "nvidia-cublas>=13,<14"


def test_metadata_gets_the_dependency_once_in_its_header():
    text = "Metadata-Version: 2.1\nName: sparsetarget\nRequires-Dist: numpy\n\n# readme\n\nRequires-Dist: no\n"
    once = backend._with_requirements(text, ["nvidia-cublas>=13,<14"])
    assert once == ("Metadata-Version: 2.1\nName: sparsetarget\nRequires-Dist: numpy\n"
                    "Requires-Dist: nvidia-cublas>=13,<14\n\n# readme\n\nRequires-Dist: no\n")
    assert backend._with_requirements(once, ["nvidia-cublas>=13,<14"]) == once


def write_wheel(path: Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("pkg-1.0.dist-info/METADATA", b"Name: pkg\nRequires-Dist: numpy\n\nreadme\n")
        z.writestr("pkg-1.0.dist-info/RECORD", b"pkg-1.0.dist-info/METADATA,sha256=old,40\n"
                                               b"pkg-1.0.dist-info/RECORD,,\n")


def test_wheel_with_the_cuda_module_depends_on_cublas_and_its_record_matches(tmp_path):
    cuda_wheel, cpu_wheel = tmp_path / "cuda.whl", tmp_path / "cpu.whl"
    write_wheel(cuda_wheel, {"sparsetarget/_cuda.cpython-311-x86_64-linux-gnu.so": b"elf"})
    write_wheel(cpu_wheel, {"sparsetarget/_core.cpython-311-x86_64-linux-gnu.so": b"elf"})
    cpu_before = cpu_wheel.read_bytes()
    for wheel in (cuda_wheel, cpu_wheel):
        backend._add_dependencies(str(wheel), ["nvidia-cublas>=13,<14"], r"/_cuda\.[^/]*so$")
    assert cpu_wheel.read_bytes() == cpu_before
    with zipfile.ZipFile(cuda_wheel) as z:
        metadata = z.read("pkg-1.0.dist-info/METADATA")
        record = z.read("pkg-1.0.dist-info/RECORD").decode()
        assert z.read("sparsetarget/_cuda.cpython-311-x86_64-linux-gnu.so") == b"elf"
    assert b"Requires-Dist: nvidia-cublas>=13,<14\n\nreadme" in metadata
    digest = base64.urlsafe_b64encode(hashlib.sha256(metadata).digest()).rstrip(b"=").decode()
    assert f"pkg-1.0.dist-info/METADATA,sha256={digest},{len(metadata)}" in record.splitlines()
