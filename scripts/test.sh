#!/usr/bin/env bash
# Installs everything (scripts/setup.sh, system packages the deploy tests use) and runs the CPU test suite.
# GPU tests: `pytest -m gpu` on a Hopper machine (scripts/gpu_check.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -f .ci/system-deps.sh ] && bash .ci/system-deps.sh
bash scripts/setup.sh
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here"; exit 1; fi
exit $rc
