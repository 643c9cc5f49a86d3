"""The join of shard stores (built in parallel, e.g. by Ray workers) into one corpus file whose
levels are HDF5 virtual datasets pointing into the shards."""

from __future__ import annotations

import os
import uuid

import h5py
import numpy as np

from . import names
from .corpus import FeatureStore
from .layout import SHA_DTYPE, write_layout


def join_shards(shards: list[str], out: str) -> int:
    """One corpus file over several shard stores: paths, hashes and pooled vectors are copied
    (the first occurrence of each sha256 kept), the levels become HDF5 virtual datasets that
    point into the shards by relative names (the corpus and its shards may move together).
    Returns the number of images; the caller builds the image index."""
    stores = [FeatureStore.open(p) for p in shards]
    try:
        first = stores[0]
        for s in stores[1:]:
            s.check_config(first.config)
            _check_same_representations(first, s)
        keep, seen = [], set()  # per shard: the rows to keep
        for s in stores:
            rows = [i for i, sha in enumerate(s.sha256s()) if not (sha in seen or seen.add(sha))]
            keep.append(np.array(rows, dtype=np.int64))
        n = int(sum(len(k) for k in keep))
        base = os.path.dirname(os.path.abspath(out))
        attrs = {k: v for k, v in first.h5.attrs.items() if k not in (names.N_COMMITTED, names.THRESHOLDS)}
        attrs["shards"] = [os.path.relpath(p, base) for p in shards]
        attrs[names.CORPUS_ID] = uuid.uuid4().hex  # a corpus of its own, not its first shard
        attrs[names.GENERATIONS] = "[]"  # its own record (its first generation: the joined rows)
        layouts = {lv: _virtual_layout(stores, keep, lv, base) for lv in first.config.levels}
        with h5py.File(out, "w") as h:
            write_layout(h, attrs, layouts, first.pool_dim, n)
            if names.REPRESENTATIONS in first.h5:
                first.h5.copy(names.REPRESENTATIONS, h)
            row = 0
            for s, k in zip(stores, keep):
                if len(k):
                    h[names.PATHS][row:row + len(k)] = list(np.array(s.paths(), dtype=object)[k])
                    h[names.SHA256][row:row + len(k)] = np.array(s.sha256s(), dtype=SHA_DTYPE)[k]
                    h[names.POOL][row:row + len(k)] = s.pool()[k]
                    for part in names.digest_parts(first.config.levels) if s.has_digests else ():
                        if names.digest(part) not in s.h5:  # digests/names: since 0.3.2
                            continue
                        recorded = s.h5[names.digest(part)][:]
                        digests = np.zeros((len(k), recorded.shape[1]), np.uint8)  # zeros: none recorded
                        known = k < len(recorded)
                        digests[known] = recorded[k[known]]
                        h[names.digest(part)][row:row + len(k)] = digests
                    row += len(k)
    finally:
        for s in stores:
            s.close()
    return n


def _check_same_representations(a: FeatureStore, b: FeatureStore) -> None:
    for lv, rep in a.representations.items():
        other = b.representations[lv].state
        same = (rep.state is None) == (other is None) and \
            (rep.state is None or all(np.array_equal(rep.state[k], other[k]) for k in rep.state))
        if not same:
            raise ValueError(f"{b.path}: its {lv} representation was fitted apart from {a.path}'s; shards of "
                             f"one corpus must share it (adopt_representations)")
        if rep.stored_channels != b.representations[lv].stored_channels:
            raise ValueError(f"{b.path}: its {lv} rows have {b.representations[lv].stored_channels} channels, "
                             f"{a.path}'s {rep.stored_channels} (written by different versions): index them again")


def _virtual_layout(stores, keep, level: str, base: str) -> h5py.VirtualLayout:
    ds0 = stores[0].stored_dataset(level)
    layout = h5py.VirtualLayout(shape=(int(sum(len(k) for k in keep)), *ds0.shape[1:]), dtype=ds0.dtype)
    row = 0
    for s, k in zip(stores, keep):
        ds = s.stored_dataset(level)
        # Relative source names resolve against the virtual file's folder.
        src = h5py.VirtualSource(os.path.relpath(s.path, base), names.level(level), shape=ds.shape)
        for a, b in _runs(k):  # one mapping per run of consecutive kept rows
            layout[row:row + b - a] = src[a:b]
            row += b - a
    return layout


def _runs(rows: np.ndarray):
    if not len(rows):
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for part in np.split(rows, breaks):
        yield int(part[0]), int(part[-1]) + 1
