#!/usr/bin/env bash
# Set up .venv and run the whole test suite (CPU; GPU tests skip without faiss-gpu and a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check spade_faiss tests benchmarks examples
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
