#!/usr/bin/env bash
# Prepares the GPU check for a GPU machine that cannot reach a package registry and has CUDA 13
# only (this workplace's device machine: Python 3.12, torch with CUDA 13, no faiss):
#   bash scripts/gpu-offline/prepare.sh [.dev]     # here, with network: ~34 MB into .dev/
#   bash scripts/gpu-offline/run.sh                # there, from the repository root
# What travels (the device tool carries at most 64 MiB with the working tree):
# - faiss-gpu 1.15.1 (Meta's wheel: CUDA 12, SASS for sm_70-sm_90) with every kernel image but
#   sm_90's blanked by keep_arch.py (a 200 MB library -> 13 MB compressed; H100/H200 only), its
#   preload of the nvidia-*-cu12 wheels off (FAISS_SKIP_GPU_PRELOAD: LD_LIBRARY_PATH has them);
# - CUDA 12's runtime (libcudart.so.12 from nvidia-cuda-runtime-cu12, 0.7 MB);
# - libcublas.so.12 built from cublas12_shim.c: faiss imports eight cuBLAS 12 functions, which it
#   forwards to the machine's libcublas.so.13 (cuBLAS 12's own wheel is ~600 MB), and an empty
#   libcublasLt.so.12 (faiss names it, imports nothing from it);
# - hdf5plugin with its Blosc2 filter only (the float16+zstd representation) and simplejpeg;
# - the magnetic_tile images the check and the user benchmark's --quick rows read (SPADE_FAISS_DATA).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEV=${1:-.dev}
REPO=$PWD
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$DEV/wheels" "$DEV/lib"
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$1" "$2"
}
get "$DEV/wheels" simplejpeg==1.9.0
tmp=$(mktemp -d)
get "$tmp" hdf5plugin==7.1.0
get "$tmp" nvidia-cuda-runtime-cu12==12.9.79
get "$tmp" faiss-gpu==1.15.1
# only its library: the wheel's nvidia/__init__.py would hide the machine's own nvidia.* packages
unzip -q -j -o "$tmp"/nvidia_cuda_runtime_cu12-*.whl "nvidia/cuda_runtime/lib/libcudart.so.12" -d "$DEV/lib"
(cd "$tmp" && unzip -q hdf5plugin-*.whl && rm -f hdf5plugin/test.py \
  && find hdf5plugin/plugins -type f ! -name libh5blosc2.so -delete \
  && tar czf hdf5plugin.tgz hdf5plugin hdf5plugin-*.dist-info)
mv "$tmp/hdf5plugin.tgz" "$DEV/"
(cd "$tmp" && mkdir faiss_gpu && cd faiss_gpu && unzip -q ../faiss_gpu-*.whl \
  && python3 "$REPO/scripts/gpu-offline/keep_arch.py" faiss/libfaiss.so 90 \
  && sed -i 's/^_preload_gpu_libs()$/import os as _os\nif not _os.environ.get("FAISS_SKIP_GPU_PRELOAD"):\n    _preload_gpu_libs()/' faiss/__init__.py \
  && grep -q FAISS_SKIP_GPU_PRELOAD faiss/__init__.py && tar cf - faiss faiss_gpu.libs faiss_gpu-*.dist-info | xz -T0 -6 > ../faiss_gpu.tar.xz)
mv "$tmp/faiss_gpu.tar.xz" "$DEV/"
rm -rf "$tmp"
S=scripts/gpu-offline
gcc -O2 -shared -fPIC -Wl,-soname,libcublas.so.12 -Wl,--version-script=$S/cublas12.map \
  -o "$DEV/lib/libcublas.so.12" $S/cublas12_shim.c -ldl
echo "" | gcc -x c -shared -fPIC -Wl,-soname,libcublasLt.so.12 -o "$DEV/lib/libcublasLt.so.12" -
# The images: the first 120 normals by name (the --quick rows hold out every 10th of them, 12,
# and index the first 60 of the other 108) and the first 24 test images interleaved over the classes, with masks.
"$PYTHON" - "$DEV/data/magnetic_tile" <<'PY'
import shutil, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from bench_user_run import interleaved_test
from common import DATA
from spade_faiss.datasets import discover
dst = Path(sys.argv[1])
train = sorted(s.path for s in discover(DATA, split="train"))[:120]
test = {s.path: s for s in discover(DATA, split="test")}
picks = [(p, None) for p in train] + [(p, test[p].mask) for p in interleaved_test(DATA)[:24]]
for path, mask in picks:
    for f in (path, mask):
        if f:
            (dst / Path(f).relative_to(DATA)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst / Path(f).relative_to(DATA))
assert interleaved_test(dst)[:24] == [str(dst / Path(p).relative_to(DATA)) for p in interleaved_test(DATA)[:24]]
print(f"{dst}: {len(picks)} images")
PY
du -sh "$DEV"
