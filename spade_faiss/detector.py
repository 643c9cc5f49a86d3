"""Spade: composes extractor, store, image index, gallery cache and patch search.

This is the only module that wires several siblings together; the flow is one way:
images -> features -> store -> index -> neighbours -> galleries -> maps -> scores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np

from . import images as imglib
from . import patch_search, scoring
from .backbone import FeatureExtractor
from .config import LEVELS, SpadeConfig
from .galleries import GalleryCache
from .image_index import ImageIndex
from .store import FeatureStore, StoreError

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 1 << 30


@dataclasses.dataclass
class SpadeResult:
    """Scores of Q images (higher = more anomalous).

    Attributes
    ----------
    paths : list of str, (Q,)
    image_scores : float32 (Q,)
    maps : float32 (Q, crop, crop), smoothed pixel scores, or None when not segmented
    neighbour_ids : int64 (Q, k_gallery), store rows of the retrieved images, nearest first
    neighbour_distances : float32 (Q, k_gallery), squared L2 of pooled vectors
    image_sizes : list of (H, W) of the original images
    segmented : bool (Q,), which images have a map (the others' rows of ``maps`` are zero)
    errors : list of (path, reason) for inputs that could not be scored
    """

    paths: list
    image_scores: np.ndarray
    maps: np.ndarray | None
    neighbour_ids: np.ndarray
    neighbour_distances: np.ndarray
    image_sizes: list
    segmented: np.ndarray
    errors: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class IndexReport:
    """What an indexing run did."""

    added: int = 0
    duplicates: int = 0
    errors: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0


class Spade:
    """SPADE anomaly detector over a FAISS-indexed HDF5 corpus of normal images.

    Parameters
    ----------
    k_image : int, default 5
        Image score = mean of the ``k_image`` smallest squared distances of pooled features.
    k_gallery : int, default 50
        Retrieved images whose patches form the stage-2 gallery (clamped to the corpus size
        with a warning).
    kappa : int, default 1
        Pixel score = mean of the ``kappa`` smallest squared patch distances.
    pixel_mode : {"per_level", "concat"}
    sigma : float, default 4
        Gaussian smoothing of maps.
    nprobe : int or None
        IVF probes (None: the index's stored default).
    device : str, default "auto"
        Backbone and patch search device: ``auto``, ``cpu``, ``cuda[:N]``.
    backbone, weights, resize, crop, levels, dtype, seed
        Feature extraction (see :class:`FeatureExtractor`, :class:`SpadeConfig`).
    batch_size : int
    cache_bytes : int
        Bound of the gallery LRU cache.
    index : {"auto", "flat", "ivf"}
    nlist : int or None
    workers : int
        Decoding threads.
    chunk_bytes : int
        Gallery bytes searched per faiss call (bounds stage-2 memory for any K).
    gpu_float16 : bool
        Stage 2 on GPU in float16 (see :func:`patch_search.level_maps`).

    Attributes
    ----------
    config_ : SpadeConfig
    store_ : FeatureStore
    index_ : ImageIndex
    extractor_ : FeatureExtractor
    timings_ : Counter
        Seconds spent per stage (``backbone``, ``stage1``, ``gallery_io``, ``stage2``,
        ``post``), accumulated over calls, for benchmarks.
    """

    def __init__(self, k_image=5, k_gallery=50, kappa=1, pixel_mode="per_level", sigma=4.0,
                 nprobe=None, device="auto", backbone="wide_resnet50_2", weights="imagenet",
                 resize=256, crop=224, levels=LEVELS, dtype="float16", seed=0, batch_size=8,
                 cache_bytes=DEFAULT_CACHE_BYTES, index="auto", nlist=None, workers=2,
                 chunk_bytes=patch_search.DEFAULT_CHUNK_BYTES, gpu_float16=False):
        self.k_image = k_image
        self.k_gallery = k_gallery
        self.kappa = kappa
        self.pixel_mode = pixel_mode
        self.sigma = sigma
        self.nprobe = nprobe
        self.device = device
        self.backbone = backbone
        self.weights = weights
        self.resize = resize
        self.crop = crop
        self.levels = levels
        self.dtype = dtype
        self.seed = seed
        self.batch_size = batch_size
        self.cache_bytes = cache_bytes
        self.index = index
        self.nlist = nlist
        self.workers = workers
        self.chunk_bytes = chunk_bytes
        self.gpu_float16 = gpu_float16

    # --- construction --------------------------------------------------------------------

    def _config(self, weights_sha256=None) -> SpadeConfig:
        return SpadeConfig(backbone=self.backbone, weights_sha256=weights_sha256, resize=self.resize,
                           crop=self.crop, levels=tuple(self.levels), dtype=self.dtype,
                           k_image=self.k_image, k_gallery=self.k_gallery, kappa=self.kappa,
                           pixel_mode=self.pixel_mode, sigma=self.sigma, nprobe=self.nprobe)

    @contextlib.contextmanager
    def _timed(self, stage: str):
        t = time.perf_counter()
        yield
        self.timings_[stage] += time.perf_counter() - t

    def _start(self, store: FeatureStore | None):
        self.timings_ = Counter()
        self._config()  # validate parameters before the (slow) model build
        self.extractor_ = FeatureExtractor(self.backbone, self.weights, self.device, self.seed)
        self.config_ = self._config(self.extractor_.weights_sha256)
        self.search_device_ = patch_search.resolve_search_device(self.device)
        if store is not None:
            store.check_config(self.config_)
            self._attach(store)

    def _attach(self, store: FeatureStore):
        self.store_ = store
        self.index_ = ImageIndex.load(store)
        if self.index_ is not None and self.index_.ntotal < len(store):
            # Rows committed after the index was last saved (a crash): add them from the store.
            log.warning("%s: index has %d of %d images; adding the rest", store.path,
                        self.index_.ntotal, len(store))
            self.index_.add(store.pool(self.index_.ntotal))
        self.cache_ = GalleryCache(self._load_galleries, self.cache_bytes)
        self.cache_mode_ = self.pixel_mode

    @classmethod
    def create(cls, path, **params) -> Spade:
        """A new corpus file at ``path`` (see :meth:`add` to fill it)."""
        spade = cls(**params)
        spade._start(None)
        spade._attach(spade._new_store(path, in_memory=False))
        return spade

    @classmethod
    def open(cls, path, mode: str = "r", **params) -> Spade:
        """Open a corpus; feature parameters default to the store's, ``weights`` must give the
        same weights the store was built with (checked by their sha256)."""
        store = FeatureStore.open(path, mode)
        try:
            c = store.config
            for key in ("backbone", "resize", "crop", "levels", "dtype"):
                params.setdefault(key, getattr(c, key))
            spade = cls(**params)
            spade._start(store)
        except Exception:
            store.close()
            raise
        return spade

    def fit(self, images, y=None) -> Spade:
        """Index ``images`` (paths or RGB uint8 arrays) in an in-memory corpus; returns self."""
        self._start(None)
        self._attach(self._new_store(f"spade-memory-{id(self)}.h5", in_memory=True))
        report = self.add(images)
        if report.errors:
            raise ValueError("cannot fit: " + "; ".join(r for _, r in report.errors[:5]))
        return self

    def _new_store(self, path, in_memory):
        probe = self.extractor_(np.zeros((1, 3, self.crop, self.crop), np.float32))
        shapes = {lv: probe[lv].shape[1:] for lv in self.config_.levels}
        return FeatureStore.create(path, self.config_, shapes, probe["pool"].shape[1], in_memory)

    def close(self):
        if getattr(self, "store_", None) is not None:
            self.store_.close()

    def reopen(self, mode: str = "r") -> Spade:
        """Open the same corpus file again (after :meth:`close`), e.g. once per batch in a
        worker that must not hold the file between batches."""
        store = FeatureStore.open(self.store_.path, mode)
        store.check_config(self.config_)
        if mode == "r" and self.index_ is not None and len(store) == self.index_.ntotal:
            self.store_ = store  # same committed rows: the index and the gallery cache stay valid
        else:
            self._attach(store)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- indexing ------------------------------------------------------------------------

    def add(self, samples: Iterable, on_batch: Callable[[int], None] | None = None) -> IndexReport:
        """Extract and append the images not yet in the store (dedupe by content sha256), then
        update and save the image index. ``on_batch(n)`` is called after every batch."""
        start = time.perf_counter()
        report = IndexReport()
        known = set(self.store_.sha256s())
        n_before = len(self.store_)
        with _Writer(self.store_) as writer:
            for batch in imglib.iter_prepared(samples, self.batch_size, self.resize, self.crop, self.workers):
                fresh = []
                for p in batch:
                    if p.error:
                        report.errors.append((p.sample.path, p.error))
                    elif p.image.sha256 in known:
                        report.duplicates += 1
                    else:
                        known.add(p.image.sha256)
                        fresh.append(p)
                if fresh:
                    feats = self.extractor_(np.stack([p.tensor for p in fresh]), self.dtype)
                    writer.put([p.image.path for p in fresh], [p.image.sha256 for p in fresh], feats)
                    report.added += len(fresh)
                if on_batch:
                    on_batch(len(batch))
        for _, reason in report.errors:
            log.warning("skipped %s", reason)
        self._update_index(n_before)
        report.seconds = time.perf_counter() - start
        return report

    def _update_index(self, n_before: int):
        n = len(self.store_)
        if n == 0:
            return
        if self.index_ is None:
            self.index_ = ImageIndex.build(self.store_.pool(), self.index, self.nlist, self.nprobe, seed=self.seed)
        elif self.index_.ntotal < n:
            self.index_.add(self.store_.pool(self.index_.ntotal))
        elif n == n_before:
            return
        self.index_.save(self.store_)

    def reindex(self, kind=None, nlist=None, nprobe=None, encoding="Flat") -> ImageIndex:
        """Rebuild (and retrain) the image index over all committed rows and save it."""
        self.index_ = ImageIndex.build(self.store_.pool(), kind or self.index, nlist or self.nlist,
                                       nprobe or self.nprobe, encoding, self.seed)
        self.index_.save(self.store_)
        return self.index_

    # --- scoring -------------------------------------------------------------------------

    def _check_ready(self):
        if getattr(self, "store_", None) is None:
            raise ValueError("this Spade is not fitted: call fit(images) or Spade.open(path)")
        if self.index_ is None or len(self.store_) == 0:
            raise ValueError(f"{self.store_.path}: the corpus holds no images")

    def _ks(self) -> tuple[int, int]:
        n = len(self.store_)
        k_gallery = self.k_gallery
        if k_gallery > n:
            if getattr(self, "_clamp_warned_", None) != n:  # once per corpus size, not per batch
                warnings.warn(f"k_gallery={k_gallery} > {n} images in the corpus: using {n}", stacklevel=3)
                self._clamp_warned_ = n
            k_gallery = n
        return min(self.k_image, k_gallery), k_gallery

    def score(self, images, segment: bool | np.ndarray = True) -> SpadeResult:
        """Score images (paths or RGB uint8 arrays).

        Parameters
        ----------
        images : sequence of paths or arrays
        segment : bool, bool array (Q,) or float
            Which images get stage 2 (pixel maps): all, none (``maps=None``), a mask, or those
            whose image score exceeds the given threshold (the paper's gating).

        Returns
        -------
        SpadeResult
        """
        self._check_ready()
        prepared = [imglib.prepare(s, self.resize, self.crop) for s in images]
        return self.score_prepared(prepared, segment)

    def score_prepared(self, prepared: list, segment=True) -> SpadeResult:
        """Score already prepared inputs (:func:`images.prepare`); failed ones go to errors."""
        self._check_ready()
        ok = [p for p in prepared if p.error is None]
        errors = [(p.sample.path, p.error) for p in prepared if p.error is not None]
        k_image, k_gallery = self._ks()
        q = len(ok)
        if q == 0:
            return SpadeResult([], np.zeros(0, np.float32), None, np.zeros((0, k_gallery), np.int64),
                               np.zeros((0, k_gallery), np.float32), [], np.zeros(0, bool), errors)
        with self._timed("backbone"):
            feats = self.extractor_(np.stack([p.tensor for p in ok]))
        with self._timed("stage1"):
            dist, ids = self.index_.search(feats["pool"], k_gallery, self.nprobe)
            scores = scoring.image_scores(dist, k_image)
        if isinstance(segment, float):
            todo = scores > segment
        else:
            todo = np.broadcast_to(np.asarray(segment, dtype=bool), (q,)).copy()
        maps = self._maps(feats, ids, todo) if todo.any() else None
        return SpadeResult([p.image.path for p in ok], scores, maps, ids, dist,
                           [p.image.size for p in ok], todo, errors)

    def _maps(self, feats: dict, ids: np.ndarray, todo: np.ndarray) -> np.ndarray:
        levels = self.config_.levels
        maps = np.zeros((len(ids), self.crop, self.crop), np.float32)
        # Queries that retrieved the same images share one search over that gallery.
        groups: dict[tuple, list[int]] = {}
        for i in np.flatnonzero(todo):
            groups.setdefault(tuple(sorted(ids[i].tolist())), []).append(int(i))
        if self.cache_mode_ != self.pixel_mode:  # cached features depend on the mode
            self.cache_, self.cache_mode_ = GalleryCache(self._load_galleries, self.cache_bytes), self.pixel_mode
        for key, members in groups.items():
            with self._timed("gallery_io"):
                galleries = self.cache_.get(key)
            with self._timed("stage2"):
                if self.pixel_mode == "concat":
                    query = {"concat": patch_search.concat_levels([feats[lv][members] for lv in levels])}
                    names = ["concat"]
                else:
                    query = {lv: feats[lv][members] for lv in levels}
                    names = list(levels)
                per_level = [patch_search.level_maps(query[n], [g[n] for g in galleries], self.kappa,
                                                     self.search_device_, self.chunk_bytes, self.gpu_float16)
                             for n in names]
            with self._timed("post"):
                maps[members] = scoring.assemble_maps(per_level, self.crop)
        with self._timed("post"):
            maps[todo] = scoring.smooth(maps[todo], self.sigma)
        return maps

    def _load_galleries(self, ids: np.ndarray) -> list[dict]:
        """Per-image gallery features (float32 (h, w, C) per level, or ``concat``)."""
        levels = self.config_.levels
        raw = {lv: self.store_.level(lv, ids) for lv in levels}
        keep16 = self.search_device_ != "cpu" and self.gpu_float16  # else float32 once, at load
        out = []
        for j in range(len(ids)):
            per = {lv: raw[lv][j] for lv in levels}
            if self.pixel_mode == "concat":
                per = {"concat": patch_search.concat_levels([per[lv][None] for lv in levels])[0]}
            elif not keep16:
                per = {k: v.astype(np.float32) for k, v in per.items()}
            out.append(per)
        return out

    def neighbour_paths(self, ids: np.ndarray) -> list[str]:
        paths = self.store_.paths()
        return [paths[int(i)] for i in ids]


class _Writer:
    """Appends batches to the store on a background thread, in order, so the backbone keeps
    computing while HDF5 writes; an error in the writer is raised in the caller."""

    def __init__(self, store: FeatureStore):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def _run(self):
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.store.append(*item)
                except BaseException as e:  # re-raised in the caller's thread
                    self.error = e

    def put(self, paths, sha256s, feats):
        if self.error is not None:
            raise self.error
        self.queue.put((paths, sha256s, feats))

    def __exit__(self, *exc):
        self.queue.put(None)
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error


__all__ = ["Spade", "SpadeResult", "IndexReport", "StoreError"]
