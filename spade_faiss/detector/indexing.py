"""Indexing: a new corpus for a model, prepared batches -> backbone features -> appended to the
corpus, new images only (deduplicated by the sha256 of their file bytes), and the image index
brought up to them."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable

import numpy as np

from ..backbone import PUBLISHED, FeatureExtractor
from ..config import SpadeConfig
from ..image_index import ImageIndex
from ..representations import FIT_IMAGES
from ..results import IndexReport
from ..store import AppendWriter, FeatureStore
from .attached import AttachedCorpus

log = logging.getLogger(__name__)


def new_store(path, extractor: FeatureExtractor, config: SpadeConfig, weights, seed: int,
              in_memory: bool) -> FeatureStore:
    """An empty corpus for ``extractor``'s features (shapes probed with one blank image), that
    records the weights' identity and where they came from."""
    config = config.replace(weights_sha256=extractor.weights_sha256)
    probe = extractor(np.zeros((1, 3, config.crop, config.crop), np.float32))
    shapes = {lv: probe[lv].shape[1:] for lv in config.levels}
    source = {"weights": weights if weights is None or weights in PUBLISHED else os.path.abspath(weights), "seed": seed}
    return FeatureStore.create(path, config, shapes, probe["pool"].shape[1], in_memory, source)


def append_new(store: FeatureStore, batches: Iterable[list], extractor: Callable, seed: int,
               on_progress: Callable[[int], None] | None = None) -> IndexReport:
    """Append the images of ``batches`` (lists of prepared inputs) not yet in ``store``; HDF5
    writes run on a background thread while the next batch is extracted. A store whose
    representations still need fitting (pca) holds back its first ``FIT_IMAGES`` new images,
    fits on their features, then writes them (docs/design.md, "Stored representations")."""
    report = IndexReport()
    known = set(store.sha256s())
    held: list[tuple] = []  # (paths, sha256s, feats) waiting for the fit
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
                feats = extractor()(np.stack([p.tensor for p in fresh]), store.input_dtype)
                item = ([_recorded(p.image.path) for p in fresh], [p.image.sha256 for p in fresh], feats)
                if store.needs_fit:
                    held.append(item)
                    if sum(len(h[0]) for h in held) >= FIT_IMAGES:
                        _fit_and_put(store, writer, held, seed)
                else:
                    writer.put(*item)
                report.added += len(fresh)
            if on_progress:
                on_progress(len(batch))
        if held:
            _fit_and_put(store, writer, held, seed)
    for _, reason in report.errors:
        log.warning("skipped %s", reason)
    return report


def _recorded(path: str) -> str:
    """The path a corpus records: absolute, so that the report's thumbnails and ``verify
    --rehash`` find the file from any working directory (``<array>`` inputs as they are)."""
    return path if path.startswith("<") else os.path.abspath(path)


def _fit_and_put(store: FeatureStore, writer: AppendWriter, held: list, seed: int) -> None:
    store.fit_representations({lv: np.concatenate([h[2][lv] for h in held]) for lv in store.config.levels}, seed)
    for item in held:
        writer.put(*item)
    held.clear()


def indexed(corpus: AttachedCorpus, options, config: SpadeConfig, rebuild: bool) -> AttachedCorpus:
    """``corpus`` with its image index brought up to the committed rows (rebuilt, or the new
    rows added) and saved in the corpus file; appends beside a read corpus only add (its readers
    add them too)."""
    store, index = corpus.store, corpus.index
    if rebuild and store.beside:
        raise ValueError(f"{store.path}: is read by another process; its image index is rebuilt when nothing reads it")
    if rebuild:
        index = ImageIndex.build(store.pool(), options.index, options.nlist, config.nprobe, options.encoding,
                                 options.seed, options.target_recall, config.k_gallery)
    else:
        index.add(store.pool(index.ntotal))
    if store.writable:
        if not rebuild and index.retune_due:  # only then every pooled vector is read
            index.retune(store.pool(), options.seed, options.target_recall, config.k_gallery)
            log.info("%s: nprobe re-tuned to %d at %d images", store.path, index.nprobe, index.ntotal)
        index.save(store)
    return corpus.with_index(index)


def add_images(corpus: AttachedCorpus, batches: Iterable[list], extractor: Callable, options, config: SpadeConfig,
               on_progress: Callable[[int], None] | None = None) -> tuple[AttachedCorpus, IndexReport]:
    """Append the new images of ``batches`` to ``corpus`` and bring its image index up to them:
    the new state and what was added."""
    if corpus.index_ahead:
        raise ValueError(corpus.problem)  # appending would overwrite rows the index returns
    start = time.perf_counter()
    n_before = len(corpus.store)
    report = append_new(corpus.store, batches, extractor, options.seed, on_progress)
    if len(corpus.store) > n_before or (corpus.index is None and len(corpus.store)):
        corpus = indexed(corpus, options, config, rebuild=corpus.index is None)
    report.seconds = time.perf_counter() - start
    return corpus, report
