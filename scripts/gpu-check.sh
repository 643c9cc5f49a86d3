#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU:
#   bash scripts/gpu-check.sh            # about 5-8 minutes: install, GPU tests, CPU vs GPU maps, images/s
# It builds .venv-gpu (torch 2.14.1 + faiss's GPU build, never beside faiss-cpu), runs the GPU
# tests (tests/test_gpu.py: GPU results equal the CPU path), scores the same images with
# --device cpu and --device cuda and prints the maps' largest difference and images/s of each,
# then the user benchmark's GPU rows (bench_user_run.py --quick --extra --device cuda), all as
# JSON lines. The data: $SPADE_FAISS_DATA, else ../shared/data/magnetic_tile; without either,
# generated images and no user rows. GPU_PYTHON=python3 skips the install and uses a Python that
# already has torch and faiss's GPU build (scripts/gpu-offline/: a machine without network).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DATA=${SPADE_FAISS_DATA:-../shared/data/magnetic_tile}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU here"; exit 1; }
if [ -n "${GPU_PYTHON:-}" ]; then
  GPY=$GPU_PYTHON
else
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  # faiss's GPU wheels on PyPI are named after their CUDA major version; the 'gpu' extra's name is
  # the conda package's. Take the first that installs.
  "$VENV/bin/python" -m pip uninstall -q -y faiss-cpu 2>/dev/null || true
  "$VENV/bin/python" -m pip install -q faiss-gpu-cu12 || "$VENV/bin/python" -m pip install -q "faiss-gpu>=1.8"
  GPY=$VENV/bin/python
fi
"$GPY" - <<'EOF'
import faiss, torch
print({"faiss": faiss.__version__, "faiss_gpus": faiss.get_num_gpus(), "torch": torch.__version__,
       "torch_cuda": torch.cuda.is_available()})
assert faiss.get_num_gpus() > 0, "faiss sees no GPU: the GPU build did not install"
EOF
# Each part runs even when the one before it failed (a machine lent for minutes gets all three);
# the exit status is that of the first that failed.
rc=0
first_failure() { [ "$rc" -ne 0 ] || rc=$1; }
timeout 200 "$GPY" -m pytest -q -p no:cacheprovider tests/test_gpu.py || first_failure $?
export OUT
timeout 200 "$GPY" - <<'EOF' || first_failure $?
"""CPU and GPU on the same corpus and images: the maps' largest difference, images/s."""
import json, os, sys, time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, "benchmarks")
from common import dataset_images  # noqa: E402
from spade_faiss.apps import cli  # noqa: E402

out = Path(os.environ["OUT"])
train, test, source = dataset_images(out, 60, 24)
(out / "train.txt").write_text("\n".join(train) + "\n")
(out / "test.txt").write_text("\n".join(test) + "\n")
store = out / "gpu_check.h5"
assert cli.main(["index", str(out / "train.txt"), "--out", str(store), "--weights", "none", "--device", "cuda"]) == 0
maps, rates = {}, {}
for device in ("cpu", "cuda"):
    run = out / f"run_{device}"
    t = time.perf_counter()
    assert cli.main(["score", str(store), str(out / "test.txt"), "--out", str(run), "--device", device,
                     "--no-overlays", "--no-report", "--restart"]) == 0
    rates[device] = len(test) / (time.perf_counter() - t)
    with h5py.File(run / "maps.h5") as h:
        maps[device] = dict(zip([p.decode() for p in h["path"][:]], h["maps"][:]))
diff = max(float(np.abs(maps["cuda"][p] - maps["cpu"][p]).max()) for p in maps["cpu"])
scale = max(float(np.abs(m).max()) for m in maps["cpu"].values())
print(json.dumps({"bench": "gpu_check", "source": source, "images": len(test), "maps_max_abs_diff": diff,
                  "maps_max_rel_diff": diff / scale, "images_per_s_cpu": round(rates["cpu"], 2),
                  "images_per_s_cuda": round(rates["cuda"], 2)}))
EOF
if [ -d "$DATA" ]; then
  # The user benchmark's GPU rows: whole processes with default outputs, --device cuda.
  timeout 240 "$GPY" benchmarks/bench_user_run.py --out "$OUT/user_run" --quick --workloads magnetic_tile \
    --data "$DATA" --steps index calibrate score score_fast --extra --device cuda || first_failure $?
fi
echo "gpu-check: done, status $rc (files under $OUT)"
exit "$rc"
