#!/usr/bin/env bash
# Set up if needed, then run the fast suite and the slow suite (real weights, real data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python -m pytest -q -m "not slow"
.venv/bin/python -m pytest -q -m slow
