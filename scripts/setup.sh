#!/usr/bin/env bash
# Sets up .venv on a fresh machine: PyTorch (the CPU build where there is no GPU), the project and its test
# dependencies, and the _C extension compiled for sm_90a when nvcc is present (else the pure-torch path serves).
# Idempotent; run by scripts/test.sh and scripts/serve.sh.
#   --if-needed: do nothing when this checkout is already installed in the venv (the stamp below matches), so
#                scripts/serve.sh starts in a second instead of re-running `pip install -e` (~15 s) every time.
# The editable install picks up Python changes by itself; the stamp covers what needs a re-install: the package
# metadata and the extension's sources.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PATH:/usr/local/cuda/bin"
VENV=${STATICMOE_VENV:-.venv}
STAMP="$VENV/.staticmoe-install-stamp"
fingerprint() { cat pyproject.toml CMakeLists.txt $(find csrc -type f | LC_ALL=C sort) | sha256sum | cut -d' ' -f1; }
if [[ "${1:-}" == "--if-needed" && -x "$VENV/bin/staticmoe" && -f "$STAMP" && "$(cat "$STAMP")" == "$(fingerprint)" ]]
then
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
"$PY" -c 'import torch' 2>/dev/null || pip_install "torch==2.13.0" || pip_install torch
pip_install "scikit-build-core>=0.10" "pybind11>=2.13" "cmake>=3.24" ninja
# The extension build needs no torch headers: nvcc + pybind11 only (compile-only where there is no GPU).
pip_install --no-build-isolation -e ".[test]"
"$PY" -c 'from model.kernels import extension; print("staticmoe kernel path:", extension.describe())'
fingerprint > "$STAMP"
