#!/usr/bin/env bash
# The user benchmark's GPU rows on the whole magnetic_tile workload (685 normals indexed, 76
# held out, 583 test images) on the device machine. Its 80 MB of images travel in two calls
# (64 MiB each, faiss in the first), the second within the machine's 30 s of warmth:
#   bash scripts/gpu-offline/user_run.sh pack     # here, after prepare.sh: .dev-normals, .dev-tests
#                                                 # (puts .dev/data and hdf5plugin aside for room)
#   bash scripts/gpu-offline/user_run.sh index    # there, carry .dev .dev-normals: install, index on cuda
#   bash scripts/gpu-offline/user_run.sh score    # there, carry .dev-tests .dev/lib: calibrate, score on cuda
# (a folder carried by the first call is gone in the second; what was installed under /tmp stays)
# The first call leaves empty stand-ins for the images of the second, so that the benchmark's
# split by name is the user run's. The corpus is stored float16 (see index). JSON lines:
# $OUT_DIR/user_run.jsonl.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=/tmp/spade-data/magnetic_tile
OUT_DIR=${OUT_DIR:-/tmp/spade-user-run}
bench() {  # bench "STEPS" [options of every command of those steps]
  local steps=$1
  shift
  # shellcheck disable=SC2086
  python3 benchmarks/bench_user_run.py --out "$OUT_DIR" --data "$DATA" --workloads magnetic_tile --keep \
    --steps $steps --extra --device cuda "$@"
}
case "${1:-}" in
  pack)
    PYTHON=${PYTHON:-.venv/bin/python}
    rm -rf .dev-normals .dev-tests
    mkdir -p /tmp/dev-aside && mv .dev/data /tmp/dev-aside/ 2>/dev/null || true
    "$PYTHON" - <<'PY'
import shutil, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from bench_user_run import split_normals
from common import DATA
from spade_faiss.datasets import discover
indexed, held = split_normals([s.path for s in discover(DATA, split="train")])
tests = [s for s in discover(DATA, split="test")]
first = [(p, ".dev-normals") for p in indexed]
second = [(p, ".dev-tests") for p in held] + [(f, ".dev-tests") for s in tests for f in (s.path, s.mask) if f]
for path, dev in first + second:
    dst = Path(dev) / "magnetic_tile" / Path(path).relative_to(DATA)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, dst)
Path(".dev-normals/later.txt").write_text("\n".join(str(Path(p).relative_to(DATA)) for p, _ in second) + "\n")
print(f"{len(first)} images for the first call, {len(second)} for the second")
PY
    mv .dev/hdf5plugin.tgz /tmp/dev-aside/ 2>/dev/null || true  # room: the stand-in does for float16 corpora
    du -sh .dev .dev-normals .dev-tests ;;
  index)
    source scripts/gpu-offline/env.sh
    rm -rf "$DATA" "$OUT_DIR" && mkdir -p "$DATA"
    cp -r .dev-normals/magnetic_tile/. "$DATA/"
    while read -r f; do mkdir -p "$(dirname "$DATA/$f")" && : > "$DATA/$f"; done < .dev-normals/later.txt
    # float16 rows, not the default float16+zstd: hdf5plugin's filter (4.7 MB) does not fit beside
    # faiss and the normals in one call; the GPU's stages are the same, reads are not compressed
    bench index --storage float16 ;;
  score)
    source scripts/gpu-offline/env.sh
    cp -r .dev-tests/magnetic_tile/. "$DATA/"
    bench "calibrate score" ;;
  *) echo "usage: $0 pack|index|score"; exit 2 ;;
esac
