"""Making a corpus writable again after its writer died (a crash, SIGKILL, power loss).

HDF5 keeps no journal: an append interrupted between its metadata writes can leave a file whose
committed rows read fine but whose next write fails ("bad heap index", "addr overflow"). A
writer therefore marks the file while it has it open; the next writer that finds the mark
rewrites the corpus from its committed rows under a temporary name and renames it over the old
one (the rows past ``n_committed`` were never part of the corpus anyway).

A corpus written before 0.3.2 keeps a fletcher32 checksum on chunks that hold many images' rows
(sha256, pool, digests; ``layout.py``): an append killed while it rewrote such a chunk in place
leaves the committed rows' bytes intact and the checksum wrong. The rewrite reads such a chunk's
stored bytes without the checksum (``_rows``); the pooled vectors are then checked against their
digests like any read.
"""

from __future__ import annotations

import json
import logging
import os

import h5py
import numpy as np

from ..config import upgrade_feature_dict
from ..representations import Representation, per_level
from . import generations, names
from .layout import write_layout

log = logging.getLogger(__name__)

COPY_ROWS = 64


def rebuild(path: str) -> int:
    """Rewrite the corpus at ``path`` from its committed rows; returns their number."""
    n = rewrite(path)
    log.warning("%s: its last writer did not close it (a crash?): rewrote it from its %d committed images",
                path, n)
    return n


def rewrite(path: str, drop=(), source: str | None = None, stop: int | None = None, change: str | None = None) -> int:
    """Rewrite the corpus at ``path`` from its committed rows except the rows ``drop`` (written
    under a temporary name, then renamed: a kill leaves the old file or the new one, never half);
    returns the rows kept. With rows dropped, the ids after them shift down: the image index
    and the leave-one-out colour scale are left out (rebuild the index: ``reindex``).

    ``source``: read the rows from that file instead (a snapshot: ``generations.py``);
    ``stop``: keep only the first ``stop`` committed rows; ``change``: the rewrite is a new
    generation (``remove``, ``rollback``): the file it replaces is kept as the snapshot of its
    generation, and the new file's record says so."""
    tmp = names.temporary(path)
    record = None
    if change:
        with h5py.File(path, "r") as now:
            past = generations.current(now)
        before = generations.snapshot_name(past[-1]["generation"])
    with h5py.File(source or path, "r") as src:
        n = int(src.attrs[names.N_COMMITTED]) if stop is None else min(stop, int(src.attrs[names.N_COMMITTED]))
        keep = np.setdiff1d(np.arange(n), np.fromiter(drop, np.int64)) if len(drop) else np.arange(n)
        if change:
            record = generations.entry(past, change, len(keep), before)
        config = upgrade_feature_dict(json.loads(src.attrs[names.CONFIG]))
        levels, v2 = config["levels"], int(src.attrs[names.FORMAT_VERSION]) >= 2
        storage = per_level(config["storage"], levels)
        shifted = len(drop) or source is not None or stop is not None
        left_out = {names.N_COMMITTED, names.WRITER} | ({names.LEAVE_ONE_OUT_THETA} if shifted else set())
        attrs = {k: v for k, v in src.attrs.items() if k not in left_out}
        specs = {lv: (src[names.level(lv)].shape[1:], src[names.level(lv)].dtype,
                      Representation(storage[lv], 1).filters() if v2 else {}) for lv in levels}
        with h5py.File(tmp, "w") as dst:
            digests = names.DIGESTS in src
            write_layout(dst, attrs, specs, src[names.POOL].shape[1], len(keep), digests=digests)
            if names.REPRESENTATIONS in src:
                src.copy(names.REPRESENTATIONS, dst)
            if names.PROJECTIONS in src:
                src.copy(names.PROJECTIONS, dst)
            copied = [names.PATHS, names.SHA256, names.POOL] + [names.level(lv) for lv in levels]
            copied += [names.digest(p) for p in names.digest_parts(levels)] if digests else []
            for name in copied:
                if name not in src:  # digests/names: written since 0.3.2 (left unset: unchecked)
                    continue
                have = keep[keep < src[name].shape[0]]  # digests may be shorter (rows written without)
                for start in range(0, len(have), COPY_ROWS):
                    rows = have[start:start + COPY_ROWS]
                    block = _rows(src[name], int(rows[0]), int(rows[-1]) + 1)
                    dst[name][start:start + len(rows)] = block[rows - rows[0]] if len(drop) else block
            index = src[names.INDEX]
            if not shifted and int(index.attrs.get("ntotal", n + 1)) <= n:  # saved after its rows: still valid
                if "faiss" in index:
                    dst[names.INDEX].create_dataset("faiss", data=index["faiss"][()])
                dst[names.INDEX].attrs.update(dict(index.attrs))
            if record is not None:
                dst.attrs[names.GENERATIONS] = json.dumps(record)
    if record is not None:
        generations.keep_snapshot(path, past[-1]["generation"])
    os.replace(tmp, path)
    return len(keep)


def _rows(ds: h5py.Dataset, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of ``ds``; a chunk whose fletcher32 (its only filter) fails is read
    as stored, without its checksum (a torn in-place rewrite: see the module's docstring)."""
    try:
        return ds[start:stop]
    except OSError:
        plist = ds.id.get_create_plist()
        if not (plist.get_nfilters() == 1 and plist.get_filter(0)[0] == h5py.h5z.FILTER_FLETCHER32):
            raise
    out = np.empty((stop - start, *ds.shape[1:]), ds.dtype)
    per = ds.chunks[0]
    for c0 in range(start - start % per, stop, per):
        lo, hi = max(start, c0), min(stop, c0 + per)
        try:
            out[lo - start:hi - start] = ds[lo:hi]
        except OSError:
            _, raw = ds.id.read_direct_chunk((c0,) + (0,) * (ds.ndim - 1))
            chunk = np.frombuffer(raw[:-4], ds.dtype).reshape(ds.chunks)  # fletcher32: 4 bytes at the end
            out[lo - start:hi - start] = chunk[lo - c0:hi - c0]
    return out
