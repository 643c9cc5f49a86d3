"""A corpus in another stored representation (``spade-faiss convert``): format v1 files migrate
to v2, float corpora become lossless or pca ones. Written whole under a temporary name and
renamed, so a crash leaves the source untouched and no half-made file."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..representations import FIT_IMAGES
from . import names
from .corpus import FeatureStore, StoreError
from .layout import write_representations

log = logging.getLogger(__name__)

COPY_ROWS = 16


def convert(src: str, dst: str, storage: str, seed: int, on_progress: Callable[[int], None] | None = None) -> dict:
    """Write the corpus ``src`` to ``dst`` with ``storage``; returns ``dst``'s description.

    The features come from ``src``'s decoded rows, so a level stored as pca cannot become
    anything else (its original features are not in the file). A lossy target invalidates the
    calibrated thresholds: they are left out (calibrate the new corpus)."""
    if os.path.exists(dst):
        raise FileExistsError(f"{dst}: already exists (choose a new name)")
    for left in names.abandoned_temporaries(dst):  # a convert killed before
        os.remove(left)
    tmp = names.temporary(dst)
    with FeatureStore.open(src) as source:
        config = source.config.replace(storage=storage)
        lossy_from = [lv for lv, r in source.representations.items()
                      if r.is_pca and config.storage_per_level()[lv] != r.name]
        if lossy_from:
            raise StoreError(f"{src}: {lossy_from} are stored as pca codes; the original features are not in the "
                             f"file, so they cannot be stored otherwise (index the images again)")
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        try:
            _write(source, tmp, config, seed, on_progress)
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    with FeatureStore.open(dst) as out:
        return out.describe()


def _write(source: FeatureStore, tmp: str, config, seed: int, on_progress) -> None:
    n = len(source)
    levels = config.levels
    out = FeatureStore.create(tmp, config, source.feature_shapes, source.pool_dim,
                              weights_source=source.weights_source())
    try:
        out.h5.attrs["converted_from"] = os.path.abspath(source.path)
        kept = {lv for lv, r in out.representations.items()
                if r.is_pca and source.representations[lv].name == r.name}  # codes copied as they are
        for lv in kept:
            out.representations[lv].state = source.representations[lv].state
        write_representations(out.h5, out.representations)
        if out.needs_fit and n:
            rows = np.arange(min(n, FIT_IMAGES))
            out.fit_representations({lv: source.level(lv, rows) for lv in levels if lv not in kept}, seed)
        paths, shas = source.paths(), source.sha256s()
        for start in range(0, n, COPY_ROWS):
            rows = np.arange(start, min(n, start + COPY_ROWS))
            feats = {lv: source.stored_level(lv, rows) if lv in kept else source.level(lv, rows) for lv in levels}
            feats["pool"] = source.pool(rows[0], rows[-1] + 1)
            out.append([paths[i] for i in rows], [shas[i] for i in rows], feats, encoded=kept)
            if on_progress:
                on_progress(len(rows))
        blob, attrs = source.records.read_index()
        if blob is not None:
            out.records.write_index(blob, attrs)
        elif attrs:
            log.warning("%s: its image index lives in a sidecar file: run `spade-faiss reindex` on the new corpus",
                        source.path)
        thresholds = source.records.thresholds()
        lossless = all(not r.is_pca for r in out.representations.values()) and \
            all(r.stored_dtype == source.representations[lv].stored_dtype for lv, r in out.representations.items())
        if thresholds and lossless:
            out.records.write_thresholds(thresholds)
        elif thresholds:
            log.warning("%s: the thresholds of %s are left out: the new representation changes the scores "
                        "(calibrate the new corpus)", tmp, source.path)
    finally:
        out.close()
