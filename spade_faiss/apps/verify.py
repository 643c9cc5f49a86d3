"""Integrity checks of a corpus file (``spade-faiss verify``): structure, committed count,
config, the image index against the rows, pooled vectors, and optionally the source files."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from ..config import FEATURE_KEYS, SpadeConfig
from ..image_index import ImageIndex
from ..images import content_sha256
from ..store import FeatureStore
from ..store.appends import segment_paths
from ..store.names import quarantined
from ..store.view import check_left_behind, segment_problem
from ..video import parse_ref

BLOCK_ROWS = 4096
# libhdf5 can loop forever on some damaged object headers (format v1-v2 corpora carry no
# metadata checksums): verify reads every attribute in a child process first, bounded by this.
METADATA_PROBE_S = 30
_PROBE = ("import sys, h5py\n"
          "def walk(name, obj):\n    [obj.attrs[k] for k in obj.attrs]\n"
          "with h5py.File(sys.argv[1], 'r') as f:\n    [f.attrs[k] for k in f.attrs]\n    f.visititems(walk)\n")


def _metadata_problem(path) -> str | None:
    """Why the file's metadata cannot be read (a hang included), or None."""
    try:
        subprocess.run([sys.executable, "-c", _PROBE, os.fspath(path)], capture_output=True, text=True,
                       timeout=METADATA_PROBE_S)
    except subprocess.TimeoutExpired:
        return (f"{path}: reading its HDF5 metadata did not finish in {METADATA_PROBE_S} s (libhdf5 loops on some "
                f"damaged object headers): the file is damaged")
    return None  # an error there is found again, and named, by the checks below


def verify(path, rehash: bool = False, deep: bool = False, repair: bool = False) -> list[str]:
    """Problems found in the corpus at ``path`` (an empty list means it is sound).

    ``deep`` reads every committed level row (finds unreadable chunks and non-finite values);
    ``rehash`` re-reads each source image and compares its sha256 with the stored one;
    ``repair`` quarantines each segment readers would refuse (renamed ``*.quarantined`` beside
    the others: kept, never read), so that the corpus opens without it (each still reported).
    """
    if os.path.isfile(path):
        hang = _metadata_problem(path)
        if hang:
            return [hang]
    try:
        store = FeatureStore.open(path)
    except (ValueError, FileNotFoundError, OSError) as e:
        return [str(e)]
    problems = []
    with store:
        n = len(store)
        problems += _check_config(store)
        if store.last_writer_died:
            problems.append(f"{path}: its last writer did not close it (a crash?); the committed rows are "
                            f"intact and the next `spade-faiss index` into it rewrites it from them")
        problems += _guarded(_check_index, store, n, deep)
        problems += _guarded(_check_pool, store, n)
        problems += _guarded(_check_names, store)
        problems += _check_segments(store, repair)
        problems += _guarded(lambda s: check_left_behind(s) or [], store)  # moved without its segments
        rows = range(n) if deep else (sorted({0, n - 1}) if n else [])
        for lv in store.config.levels:
            for i in rows:
                try:
                    row = store.level(lv, [i])
                except Exception as e:  # any HDF5 read failure is a finding, not a crash
                    problems.append(f"{path}: levels/{lv} row {i} unreadable ({e})")
                    break
                if not np.isfinite(row).all():
                    problems.append(f"{path}: levels/{lv} row {i} holds nan or inf")
                    break
        if rehash:
            problems += _check_sources(store.paths(), store.sha256s())
    return problems


def _guarded(check, store, *args) -> list[str]:
    """A check's problems; an unreadable dataset (``StoreError`` naming it) is one more."""
    try:
        return check(store, *args)
    except (ValueError, OSError) as e:
        return [str(e)]


def _check_segments(store, repair: bool = False) -> list[str]:
    """Each segment beside the corpus that readers would refuse (foreign, out of sequence,
    stale, unreadable), by name; with ``repair``, each is quarantined (renamed, kept)."""
    problems = []
    for path in segment_paths(store.path):
        try:
            with FeatureStore.open(path) as seg:
                problem = segment_problem(store, seg)
        except (ValueError, OSError) as e:
            problem = f"{path}: unreadable segment ({e})"
        if problem and repair:
            os.replace(path, quarantined(path))
            problem += f" [quarantined as {os.path.basename(quarantined(path))}]"
        if problem:
            problems.append(problem)
    return problems


def _check_names(store) -> list[str]:
    problems = []
    shas = store.sha256s()
    if len(set(shas)) != len(shas):
        problems.append(f"{store.path}: {len(shas) - len(set(shas))} duplicate image sha256 values")
    bad = [s for s in shas if len(s) != 64 or any(c not in "0123456789abcdef" for c in s)]
    if bad:
        problems.append(f"{store.path}: {len(bad)} malformed sha256 values, first {bad[0]!r}")
    bad = store.mismatched_names()  # a damaged chunk of images/path: StoreError, a finding
    if bad:
        problems.append(f"{store.path}: the path or sha256 of {len(bad)} images differs from its digest "
                        f"(first: row {bad[0]}): the file is damaged")
    return problems


def _check_config(store) -> list[str]:
    raw = store.raw_config()
    missing = [k for k in FEATURE_KEYS if k not in raw]
    if missing:
        return [f"{store.path}: config lacks {missing}"]
    try:
        SpadeConfig(**raw)
    except ValueError as e:
        return [f"{store.path}: invalid config ({e})"]
    return []


def _check_index(store, n, deep: bool) -> list[str]:
    try:
        index = ImageIndex.load(store)
    except ValueError as e:
        return [str(e)]
    if index is None:
        return [f"{store.path}: no image index (run `spade-faiss reindex {store.path}`)"] if n else []
    problems = []
    if index.ntotal != n:
        problems.append(f"{store.path}: image index holds {index.ntotal} vectors, the store {n} rows "
                        f"(run `spade-faiss reindex {store.path}`)")
    rows = np.arange(min(n, index.ntotal))
    if not deep:  # a sample; --deep compares every row
        rows = np.unique(np.linspace(0, len(rows) - 1, min(len(rows), 64)).astype(np.int64)) if len(rows) else rows
    for start in range(0, len(rows), BLOCK_ROWS):
        block = rows[start:start + BLOCK_ROWS]
        bad = index.mismatched_rows(store.pool()[block] if not deep else store.pool(block[0], block[-1] + 1),
                                    block)
        if bad:
            problems.append(f"{store.path}: the image index's vectors of rows {bad[:5]} differ from images/pool "
                            f"({len(bad)} rows; run `spade-faiss reindex {store.path}`)")
            break
    problems += ImageIndex.sidecar_problems(store)
    return problems


def _check_pool(store, n) -> list[str]:
    for s in range(0, n, BLOCK_ROWS):
        block = store.pool(s, s + BLOCK_ROWS)
        if not np.isfinite(block).all():
            return [f"{store.path}: images/pool rows {s}..{s + len(block) - 1} hold nan or inf"]
    return []


def _check_sources(paths, shas) -> list[str]:
    problems = []
    for p, s in zip(paths, shas):
        ref = parse_ref(p)
        if not os.path.isfile(ref.video if ref else p):
            problems.append(f"{p}: source image missing")
            continue
        try:
            if content_sha256(p) != s:
                problems.append(f"{p}: content changed since indexing (sha256 differs)")
        except (OSError, ValueError) as e:
            problems.append(f"{p}: unreadable ({e})")
    return problems
