#!/usr/bin/env bash
# The PatchCore peer's own virtual environment (never this project's): the authors' code
# (github.com/amazon-science/patchcore-inspection, src/ on PYTHONPATH) and its requirements.
# Usage: benchmarks/peers/setup_patchcore.sh VENV SRC_CHECKOUT
set -euo pipefail
VENV=${1:-/tmp/pcvenv}
SRC=${2:-/tmp/patchcore-inspection}
[ -d "$SRC/src/patchcore" ] || git clone --depth 1 https://github.com/amazon-science/patchcore-inspection "$SRC"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/pip" install -q faiss-cpu click pillow scikit-image scikit-learn scipy tqdm matplotlib pretrainedmodels six timm
echo "peer ready: PYTHONPATH=$SRC/src $VENV/bin/python"
