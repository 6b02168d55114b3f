#!/usr/bin/env bash
# Sets up .venv on a fresh machine: PyTorch (the CPU build where there is no GPU), the project and its test
# dependencies, and the _C extension compiled for sm_90a when nvcc is present (else the pure-torch path serves).
# Idempotent; sourced by scripts/test.sh and scripts/serve.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PATH:/usr/local/cuda/bin"
VENV=${STATICMOE_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
"$PY" -c 'import torch' 2>/dev/null || pip_install "torch==2.13.0" || pip_install torch
pip_install "scikit-build-core>=0.10" "pybind11>=2.13" "cmake>=3.24" ninja
# The extension build needs no torch headers: nvcc + pybind11 only (compile-only where there is no GPU).
pip_install --no-build-isolation -e ".[test]"
"$PY" -c 'from model.kernels import extension; print("staticmoe kernel path:", extension.describe())'
