#!/usr/bin/env bash
# Installs (scripts/setup.sh) and serves the embedded `tiny` MoE model; extra arguments go to `staticmoe serve`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/staticmoe serve "$@"
