#!/usr/bin/env bash
# Test a built wheel as a user gets it: install it into a fresh venv (no source tree, no build), then run the test
# suite from a copy of tests/ in a temporary directory, with only that venv on PATH (no compiler).
#
#   tools/test_wheel.sh WHEEL [EXTRAS]     (EXTRAS: what else to install for the tests; default "pytest scipy torch")
set -euo pipefail
cd "$(dirname "$0")/.."
wheel="$(realpath "$1")"
extras="${2:-pytest scipy torch}"
python="${PYTHON:-python3}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
# --only-binary: the wheel itself, never a source build of sparsetarget
# shellcheck disable=SC2086
"$work/venv/bin/python" -m pip install --quiet --only-binary sparsetarget "$wheel" $extras
mkdir "$work/run"
cp -r tests "$work/run/tests"
# pytest's settings (strict markers, warnings as errors) live in pyproject.toml; it holds no code
cp pyproject.toml "$work/run/"
cd "$work/run"
env -i HOME="$HOME" PATH="$work/venv/bin" LANG=C.UTF-8 "$work/venv/bin/python" - <<'PY'
import os, shutil, sys
import sparsetarget
where = os.path.dirname(sparsetarget.__file__)
assert where.startswith(sys.prefix), f"sparsetarget was imported from {where}, not from the wheel's venv"
assert not any(shutil.which(cc) for cc in ("cc", "gcc", "g++", "c++", "clang", "nvcc")), "a compiler is on PATH"
print(f"testing the installed wheel: {where}, build_info()={sparsetarget.build_info()}")
PY
env -i HOME="$HOME" PATH="$work/venv/bin" LANG=C.UTF-8 "$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests
