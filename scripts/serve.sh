#!/usr/bin/env bash
# Installs (scripts/setup.sh, skipped when this checkout is installed already) and serves the embedded `tiny` MoE
# model; extra arguments go to `staticmoe serve`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh --if-needed
exec "${STATICMOE_VENV:-.venv}/bin/staticmoe" serve "$@"
