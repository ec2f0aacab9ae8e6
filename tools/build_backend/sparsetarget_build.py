"""Build backend of sparsetarget: scikit-build-core, plus cuBLAS for the CUDA backend when it is needed.

``pip install .`` builds in an isolated environment that holds only the build requirements, so a CUDA build needs
cuBLAS there even when the CUDA build of torch is about to be installed beside sparsetarget. When nvcc is found (on
PATH or as $CUDACXX) and its toolkit has no cuBLAS, this backend adds the matching ``nvidia-cublas`` wheel to the
build requirements (CMake finds it through the building Python) and to the wheel's dependencies (``_cuda`` loads
``libcublas`` from it at run time through its RPATH, ``$ORIGIN/../nvidia/cu13/lib``). Nothing is added when
``-C cmake.define.SPARSETARGET_WITH_CUDA=OFF`` or ``-C cmake.define.SPARSETARGET_CUBLAS_ROOT=...`` is given, without
nvcc, or when the toolkit has cuBLAS. Everything else is scikit-build-core's ``scikit_build_core.build``.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import importlib
import os
import re
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Mapping
from types import ModuleType
from typing import Optional, Union

__all__ = [
    "build_editable",
    "build_sdist",
    "build_wheel",
    "cuda_requirements",
    "get_requires_for_build_editable",
    "get_requires_for_build_sdist",
    "get_requires_for_build_wheel",
    "prepare_metadata_for_build_editable",
    "prepare_metadata_for_build_wheel",
]

ConfigSettings = Optional[Mapping[str, Union[str, list[str]]]]

# The cuBLAS wheel of each CUDA major version (CUDA 13 dropped the -cuXX suffix).
CUBLAS_WHEELS = {12: "nvidia-cublas-cu12>=12,<13", 13: "nvidia-cublas>=13,<14"}


def _skbuild() -> ModuleType:
    """scikit-build-core's backend, imported when a hook runs (so cuda_requirements() is usable without it)."""
    return importlib.import_module("scikit_build_core.build")


def build_sdist(sdist_directory: str, config_settings: ConfigSettings = None) -> str:
    """scikit-build-core's sdist (it includes this backend, which ``backend-path`` names)."""
    return _skbuild().build_sdist(sdist_directory, config_settings)


def get_requires_for_build_sdist(config_settings: ConfigSettings = None) -> list[str]:
    """scikit-build-core's requirements for an sdist."""
    return _skbuild().get_requires_for_build_sdist(config_settings)


def _setting(config_settings: ConfigSettings, name: str) -> str:
    value = (config_settings or {}).get(f"cmake.define.{name}", "")
    return str(value[-1] if isinstance(value, list) and value else value or "")


def _toolkit(nvcc: str) -> tuple[str, int | None]:
    """(toolkit root, CUDA major version) as nvcc reports them; nvcc may be a wrapper script outside the toolkit."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    major = None
    try:
        dry = subprocess.run([nvcc, "-v", "--dryrun", "-c", "sparsetarget_probe.cu"], capture_output=True, text=True,
                             timeout=60)
        top = re.search(r"#\$ TOP=(.*)", dry.stdout + dry.stderr)
        if top:
            root = os.path.realpath(top.group(1).strip())
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        release = re.search(r"release (\d+)\.", version)
        major = int(release.group(1)) if release else None
    except (OSError, subprocess.SubprocessError):
        pass
    return root, major


def _toolkit_has_cublas(root: str) -> bool:
    libs = [f"{root}/{sub}/libcublas.so*" for sub in ("lib64", "lib", "targets/*/lib")]
    headers = [f"{root}/{sub}/cublas_v2.h" for sub in ("include", "targets/*/include")]
    return any(glob.glob(p) for p in libs) and any(glob.glob(p) for p in headers)


def cuda_requirements(config_settings: ConfigSettings = None, environ: Mapping[str, str] | None = None) -> list[str]:
    """The cuBLAS wheel a CUDA build needs here, as a requirement list: empty, or one ``nvidia-cublas`` spec."""
    env = os.environ if environ is None else environ
    if _setting(config_settings, "SPARSETARGET_WITH_CUDA").upper() == "OFF":
        return []
    if _setting(config_settings, "SPARSETARGET_CUBLAS_ROOT"):
        return []
    nvcc = env.get("CUDACXX") or shutil.which("nvcc", path=env.get("PATH", os.defpath))
    if not nvcc or not os.path.exists(nvcc):
        return []
    root, major = _toolkit(nvcc)
    if major not in CUBLAS_WHEELS or _toolkit_has_cublas(root):
        return []
    return [CUBLAS_WHEELS[major]]


def get_requires_for_build_wheel(config_settings: ConfigSettings = None) -> list[str]:
    """scikit-build-core's requirements, plus the cuBLAS wheel when a CUDA build needs one (module docstring)."""
    return [*_skbuild().get_requires_for_build_wheel(config_settings), *cuda_requirements(config_settings)]


def get_requires_for_build_editable(config_settings: ConfigSettings = None) -> list[str]:
    """As :func:`get_requires_for_build_wheel`, for ``pip install -e``."""
    return [*_skbuild().get_requires_for_build_editable(config_settings), *cuda_requirements(config_settings)]


def _with_requirements(metadata: str, requirements: list[str]) -> str:
    """METADATA text with ``Requires-Dist`` lines for ``requirements`` added to its header (once)."""
    head, sep, body = metadata.partition("\n\n")
    lines = head.split("\n")
    for requirement in requirements:
        line = f"Requires-Dist: {requirement}"
        if line not in lines:
            lines.append(line)
    return "\n".join(lines) + sep + body


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _add_dependencies(wheel_path: str, requirements: list[str], needs: str) -> None:
    """Add ``requirements`` to the wheel's METADATA (and RECORD) when the wheel holds a file matching ``needs``."""
    with zipfile.ZipFile(wheel_path) as zin:
        names = zin.namelist()
        if not requirements or not any(re.search(needs, n) for n in names):
            return
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        metadata = _with_requirements(zin.read(metadata_name).decode(), requirements).encode()
        tmp = tempfile.NamedTemporaryFile(dir=os.path.dirname(wheel_path), suffix=".whl", delete=False)
        tmp.close()
        with zipfile.ZipFile(tmp.name, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if info.filename == metadata_name:
                    zout.writestr(info, metadata)
                elif info.filename == record_name:
                    rows = []
                    for row in zin.read(record_name).decode().splitlines():
                        if row.startswith(metadata_name + ","):
                            row = f"{metadata_name},{_record_hash(metadata)},{len(metadata)}"
                        rows.append(row)
                    zout.writestr(info, "\n".join(rows) + "\n")
                else:
                    zout.writestr(info, zin.read(info.filename))
    os.chmod(tmp.name, os.stat(wheel_path).st_mode)
    os.replace(tmp.name, wheel_path)


def _prepare(metadata_directory: str, config_settings: ConfigSettings, editable: bool) -> str:
    backend = _skbuild()
    prepare = backend.prepare_metadata_for_build_editable if editable else backend.prepare_metadata_for_build_wheel
    dist_info = prepare(metadata_directory, config_settings)
    path = os.path.join(metadata_directory, dist_info, "METADATA")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(_with_requirements(text, cuda_requirements(config_settings)))
    return dist_info


def prepare_metadata_for_build_wheel(metadata_directory: str, config_settings: ConfigSettings = None) -> str:
    """scikit-build-core's metadata, with the cuBLAS wheel as a dependency when the build will link it."""
    return _prepare(metadata_directory, config_settings, editable=False)


def prepare_metadata_for_build_editable(metadata_directory: str, config_settings: ConfigSettings = None) -> str:
    """As :func:`prepare_metadata_for_build_wheel`, for ``pip install -e``."""
    return _prepare(metadata_directory, config_settings, editable=True)


def build_wheel(wheel_directory: str, config_settings: ConfigSettings = None,
                metadata_directory: str | None = None) -> str:
    """scikit-build-core's wheel; when it holds the CUDA backend linked to the cuBLAS wheel, that wheel is one of
    its dependencies."""
    # Not metadata_directory: scikit-build-core would refuse the added dependency as a mismatch with its own.
    name = _skbuild().build_wheel(wheel_directory, config_settings, None)
    _add_dependencies(os.path.join(wheel_directory, name), cuda_requirements(config_settings), r"/_cuda\.[^/]*so$")
    return name


def build_editable(wheel_directory: str, config_settings: ConfigSettings = None,
                   metadata_directory: str | None = None) -> str:
    """As :func:`build_wheel`, for ``pip install -e`` (the extension modules are in the editable wheel too)."""
    name = _skbuild().build_editable(wheel_directory, config_settings, None)
    _add_dependencies(os.path.join(wheel_directory, name), cuda_requirements(config_settings), r"/_cuda\.[^/]*so$")
    return name
