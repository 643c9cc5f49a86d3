#!/usr/bin/env bash
# On the device machine (see prepare.sh): installs what .dev/ carries beside the machine's own
# torch, then runs scripts/gpu-check.sh with that Python.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEV=${DEV:-.dev}
SITE=${SITE:-/tmp/site}
rm -rf "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$DEV"/wheels/*.whl
tar xzf "$DEV/hdf5plugin.tgz" -C "$SITE"
tar xJf "$DEV/faiss_gpu.tar.xz" -C "$SITE"
cublas13=$(find /opt /usr /lib* \( -path /proc -o -path /sys \) -prune -o -name libcublas.so.13 -print 2>/dev/null | head -1)
[ -n "$cublas13" ] || { echo "no libcublas.so.13 on this machine"; exit 1; }
export LD_LIBRARY_PATH="$PWD/$DEV/lib:$(dirname "$cublas13")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export FAISS_SKIP_GPU_PRELOAD=1   # its loader looks for the cu12 wheels; LD_LIBRARY_PATH has them
export SPADE_FAISS_DATA="$PWD/$DEV/data/magnetic_tile"
echo "cublas 13: $cublas13"
GPU_PYTHON=python3 bash scripts/gpu-check.sh
