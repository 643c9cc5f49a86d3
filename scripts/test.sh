#!/usr/bin/env bash
# Set up .venv and run the whole test suite (CPU; GPU tests skip without faiss-gpu and a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check spade_faiss tests benchmarks examples
command -v chromedriver >/dev/null 2>&1 || echo "note: no chromedriver here: the report's browser test will be skipped (.ci/run installs Debian's chromium and chromium-driver; apt-get install them to run it)"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
