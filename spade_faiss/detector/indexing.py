"""Indexing: prepared batches -> backbone features -> appended to the corpus, new images only
(deduplicated by the sha256 of their file bytes)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np

from ..results import IndexReport
from ..store import AppendWriter, FeatureStore

log = logging.getLogger(__name__)


def append_new(store: FeatureStore, batches: Iterable[list], extractor: Callable, dtype: str,
               on_progress: Callable[[int], None] | None = None) -> IndexReport:
    """Append the images of ``batches`` (lists of prepared inputs) not yet in ``store``; HDF5
    writes run on a background thread while the next batch is extracted."""
    report = IndexReport()
    known = set(store.sha256s())
    with AppendWriter(store) as writer:
        for batch in batches:
            fresh = []
            for p in batch:
                if p.error:
                    report.errors.append((p.path, p.error))
                elif p.image.sha256 in known:
                    report.duplicates += 1
                else:
                    known.add(p.image.sha256)
                    fresh.append(p)
            if fresh:
                feats = extractor()(np.stack([p.tensor for p in fresh]), dtype)
                writer.put([p.image.path for p in fresh], [p.image.sha256 for p in fresh], feats)
                report.added += len(fresh)
            if on_progress:
                on_progress(len(batch))
    for _, reason in report.errors:
        log.warning("skipped %s", reason)
    return report
