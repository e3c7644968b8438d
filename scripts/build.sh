#!/usr/bin/env bash
# Set up, then run the whole SciFact build (distill -> export -> evaluate -> index -> artifact).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/index-build all --config "${1:-configs/scifact.toml}"
