#!/usr/bin/env bash
# Create .venv with everything the project needs (idempotent). CPU build of faiss; for the GPU
# build use `pip install -e ".[gpu,dev]"` instead of ".[cpu,dev]" (never both).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[cpu,dev]"
