# Sourced on the device machine (run.sh, user_run.sh): installs what $DEV carries into $SITE
# beside the machine's own torch (once per machine) and exports the paths faiss-gpu needs.
DEV=${DEV:-.dev}
SITE=${SITE:-/tmp/site}
if [ ! -d "$SITE/faiss" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$DEV"/wheels/*.whl
  tar xJf "$DEV/faiss_gpu.tar.xz" -C "$SITE"
  if [ -f "$DEV/hdf5plugin.tgz" ]; then
    tar xzf "$DEV/hdf5plugin.tgz" -C "$SITE"
  else  # left behind to make room: only the float16+zstd representation needs its filter
    mkdir -p "$SITE/hdf5plugin" && echo '"""Stand-in: no HDF5 filters here."""' > "$SITE/hdf5plugin/__init__.py"
  fi
fi
cublas13=$(find /opt /usr /lib* \( -path /proc -o -path /sys \) -prune -o -name libcublas.so.13 -print 2>/dev/null | head -1)
[ -n "$cublas13" ] || { echo "no libcublas.so.13 on this machine"; exit 1; }
export LD_LIBRARY_PATH="$PWD/$DEV/lib:$(dirname "$cublas13")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export FAISS_SKIP_GPU_PRELOAD=1   # its loader looks for the cu12 wheels; LD_LIBRARY_PATH has them
echo "cublas 13: $cublas13"
