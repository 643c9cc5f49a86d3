#!/usr/bin/env bash
# On the device machine (see prepare.sh): installs what .dev/ carries beside the machine's own
# torch, then runs scripts/gpu-check.sh with that Python.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf "${SITE:-/tmp/site}"
source scripts/gpu-offline/env.sh
export SPADE_FAISS_DATA="$PWD/$DEV/data/magnetic_tile"
GPU_PYTHON=python3 bash scripts/gpu-check.sh
