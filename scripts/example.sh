#!/usr/bin/env bash
# Set up .venv and run the built-in example: a small synthetic MVTec-style category is indexed
# and scored with the default backbone; outputs land in examples/out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/example.py "$@"
