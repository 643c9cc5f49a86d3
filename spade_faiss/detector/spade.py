"""Spade: the public face of the detector (parameters, corpus, indexing, thresholds, scoring).

Data flows one way: images -> features (backbone) -> store -> image index -> neighbours ->
galleries (cache) -> stage-2 distances (patch_search) -> maps and scores (scoring) ->
thresholds and verdicts. The applications (CLI, service, Ray, evaluation) call Spade; none of
them reads the store or runs a stage itself.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from .. import images, patch_search, scoring
from ..backbone import FeatureExtractor, check_weights, load_extractor
from ..config import DEFAULTS, PARAM, Maps, Parameters, check_values, make_configs, parameters_doc
from ..memory import GIB, MemoryBudget
from ..representations import FIT_IMAGES
from ..results import IndexReport, Retrieved, ScoredImage, SpadeResult
from ..store import CorpusView, FeatureStore, join_shards, open_corpus, remove_rows, resolve, roll_back
from ..store import convert as convert_store
from ..store.appends import clear_removed, write_removed
from . import thresholds
from .attached import attach
from .indexing import add_images, indexed, new_store

log = logging.getLogger(__name__)


class Spade(Parameters):
    """SPADE anomaly detector over a FAISS-indexed HDF5 corpus of normal images.

    Scores are "higher = more anomalous" everywhere (image scores, maps, thresholds).
    Parameters are keyword-only and declared once, in :data:`spade_faiss.config.PARAMETERS`
    (the section below is made from it). :meth:`open` defaults the feature parameters and the
    weights to what the corpus was built with.

    {parameters}

    Attributes
    ----------
    config_ : SpadeConfig
        The parameters in force (the one source of truth after fit/open).
    options_ : RunOptions
    corpus_ : AttachedCorpus
        The corpus this Spade answers from, as one value (``detector/attached.py``); the
        attributes below read it.
    store_ : CorpusView
        The corpus file and the segments appended beside it (``store/view.py``).
    index_ : ImageIndex or None
    tau_, theta_ : float or None
        Image and pixel thresholds set by :meth:`calibrate` (stored in the corpus).
    timings_ : Counter
        Seconds spent per stage (``backbone``, ``stage1``, ``gallery_io``, ``stage2``, ``post``).
    pruning_stats_ : dict
        Per level: pairs covered, re-checked exactly, and the fraction skipped (``pruned``).
    bytes_read_ : int
        Stored gallery bytes read from the corpus so far.
    memory_ : dict
        The memory budget: ``memory_gb``, one batch's work as learned, the gallery cache's bound
        and size, and whether the budget could be kept.
    """

    def __init__(self, *, k_image=DEFAULTS["k_image"], k_gallery=DEFAULTS["k_gallery"], kappa=DEFAULTS["kappa"],
                 pixel_mode=DEFAULTS["pixel_mode"], sigma=DEFAULTS["sigma"], nprobe=DEFAULTS["nprobe"],
                 search=DEFAULTS["search"], radius=DEFAULTS["radius"], image_score=DEFAULTS["image_score"],
                 same_position=DEFAULTS["same_position"], backbone=DEFAULTS["backbone"],
                 weights=DEFAULTS["weights"], seed=DEFAULTS["seed"], resize=DEFAULTS["resize"],
                 crop=DEFAULTS["crop"], levels=DEFAULTS["levels"], storage=DEFAULTS["storage"],
                 device=DEFAULTS["device"], batch_size=DEFAULTS["batch_size"], workers=DEFAULTS["workers"],
                 cache_bytes=DEFAULTS["cache_bytes"], memory_gb=DEFAULTS["memory_gb"], spill_gb=DEFAULTS["spill_gb"],
                 chunk_bytes=DEFAULTS["chunk_bytes"], stage2=DEFAULTS["stage2"],
                 gpu_float16=DEFAULTS["gpu_float16"], index=DEFAULTS["index"], nlist=DEFAULTS["nlist"],
                 encoding=DEFAULTS["encoding"], target_recall=DEFAULTS["target_recall"]):
        self.k_image = k_image
        self.k_gallery = k_gallery
        self.kappa = kappa
        self.pixel_mode = pixel_mode
        self.sigma = sigma
        self.nprobe = nprobe
        self.search = search
        self.radius = radius
        self.image_score = image_score
        self.same_position = same_position
        self.backbone = backbone
        self.weights = weights
        self.seed = seed
        self.resize = resize
        self.crop = crop
        self.levels = levels
        self.storage = storage
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.cache_bytes = cache_bytes
        self.memory_gb = memory_gb
        self.spill_gb = spill_gb
        self.chunk_bytes = chunk_bytes
        self.stage2 = stage2
        self.gpu_float16 = gpu_float16
        self.index = index
        self.nlist = nlist
        self.encoding = encoding
        self.target_recall = target_recall

    def validate_params(self) -> Spade:
        """Check every parameter now (nothing is built); raises ``ValueError``. Returns self."""
        self._configure(getattr(getattr(self, "config_", None), "weights_sha256", None))
        return self

    def _configure(self, weights_sha256=None) -> None:
        """Validate every parameter (before any model is built) into ``config_``/``options_``."""
        self.config_, self.options_ = make_configs(self.get_params(), weights_sha256)
        check_weights(self.weights, self.config_.backbone)
        self.search_device_ = patch_search.resolve_search_device(self.options_.device)
        patch_search.resolve_engine(self.options_.stage2, self.search_device_)

    @property
    def timings_(self):
        """Seconds spent per stage, accumulated over calls (see the class docstring)."""
        return self.pipeline_.timings

    @property
    def pruning_stats_(self) -> dict:
        """Per level (or ``concat``), accumulated over calls: the (query, gallery) pairs stage 2
        covered, those the ``pruned`` engine re-checked exactly, and the fraction it skipped."""
        return self.pipeline_.pruning_stats()

    @property
    def memory_(self) -> dict:
        """The memory budget as it stands: ``memory_gb``, one batch's work as learned, the gallery
        cache's bound and size (GiB), and whether the budget could be kept (``memory.py``)."""
        return self.pipeline_.budget.summary(self.pipeline_.cache)

    @property
    def bytes_read_(self) -> int:
        """Stored bytes of gallery rows read from the corpus so far (compressed sizes for
        compressed levels; gallery cache hits read nothing)."""
        return self.store_.bytes_read

    def _extractor(self) -> FeatureExtractor:
        if getattr(self, "extractor_", None) is None:
            self.extractor_ = load_extractor(self.backbone, self.weights, self.options_.device, self.seed,
                                             self.config_.weights_sha256)
        return self.extractor_

    def load_backbone(self) -> Spade:
        """Build the model now (it is otherwise built on first use); returns self."""
        self._extractor()
        return self

    @property
    def model_key(self) -> tuple:
        """What makes two corpora's models one: (architecture, sha256 of the weights' tensors,
        device)."""
        return self.config_.backbone, self.config_.weights_sha256, self.options_.device

    def share_backbone(self, other: Spade) -> Spade:
        """Use ``other``'s model instead of building one (a service with several corpora built
        from the same weights keeps one copy); refused for another :attr:`model_key`. Returns
        self."""
        mine, theirs = self.model_key, other.model_key
        if mine != theirs:
            raise ValueError(f"cannot share a model: this corpus needs {mine[0]} weights {str(mine[1])[:12]} on "
                             f"{mine[2]}, the other has {theirs[0]} {str(theirs[1])[:12]} on {theirs[2]}")
        self.extractor_ = other._extractor()
        return self

    # --- the attached corpus (detector/attached.py) ---------------------------------------

    @classmethod
    def create(cls, path, like=None, **params) -> Spade:
        """A new, empty corpus file at ``path`` (fill it with :meth:`add`). ``like``: a corpus
        file whose fitted stored representations this one shares (the shards of one corpus)."""
        spade = cls(**params)
        spade._configure()
        if os.path.exists(path):
            raise FileExistsError(f"{path}: already exists (open it to append, or choose a new name)")
        spade._attach(spade._new_store(path, in_memory=False))
        if like is not None:
            with FeatureStore.open(like) as template:
                spade.store_.adopt_representations(template)
        return spade

    @classmethod
    def open(cls, path, mode: str = "r", generation: int | None = None, **params) -> Spade:
        """Open a corpus. Feature parameters and the weights default to the corpus's own; other
        weights are refused (compared by the sha256 of their tensors) when the model loads.

        ``mode``: ``"r"`` to score, ``"a"`` to add images or calibrate (into the file, or beside
        it while other processes read it). ``generation``: read the corpus as it was after that
        many segments appended beside it (the state a service's answer reports), not all."""
        store = open_corpus(path, mode, generation)
        try:
            c = store.config
            for key in ("backbone", "resize", "crop", "levels", "storage"):
                params.setdefault(key, getattr(c, key))
            source = store.weights_source()
            for key in ("weights", "seed"):
                if key in source:
                    params.setdefault(key, source[key])
            spade = cls(**params)
            spade._configure(c.weights_sha256)
            store.check_config(spade.config_)
            spade._attach(store)
        except Exception:
            store.close()
            raise
        if mode == "a":
            spade._compact()
        return spade

    def fit(self, images_, y=None) -> Spade:
        """Index ``images_`` (paths, dataset samples or RGB uint8 arrays) in an in-memory corpus
        and return self (scikit-learn style)."""
        self._configure()
        self._attach(self._new_store(f"spade-memory-{id(self)}.h5", in_memory=True))
        report = self.add(images_)
        if report.errors:
            raise ValueError("cannot fit: " + "; ".join(r for _, r in report.errors[:5]))
        return self

    def fit_storage(self, samples: Iterable) -> Spade:
        """Fit the stored representations on the features of up to ``FIT_IMAGES`` of ``samples``
        without adding them (:meth:`add` does it on the first images otherwise); returns self."""
        if self.store_.needs_fit:
            prepared = [p for batch in self._batches(list(samples)[:FIT_IMAGES]) for p in batch if p.error is None]
            if not prepared:
                raise ValueError("no decodable image to fit the stored representations on")
            feats = self._extractor()(np.stack([p.tensor for p in prepared]), "float32")
            self.store_.fit_representations(feats, self.seed)
        return self

    def _new_store(self, path, in_memory: bool) -> CorpusView:
        store = new_store(path, self._extractor(), self.config_, self.weights, self.seed, in_memory)
        self.config_ = store.config.replace(**self.config_.scoring_dict())
        return CorpusView(store)

    def _attach(self, store: CorpusView) -> Spade:
        o = self.options_
        self.corpus_ = attach(store, self._extractor, MemoryBudget(o.memory_gb, o.cache_bytes), o.seed,
                              int(o.spill_gb * GIB))
        return self

    def close(self):
        if getattr(self, "corpus_", None) is not None:
            self.corpus_.close()

    def reopen(self, mode: str = "r") -> Spade:
        """Open the same corpus file again after :meth:`close`, keeping the model (a worker that
        must not hold the file between batches); returns self."""
        store = open_corpus(self.store_.path, mode)
        store.check_config(self.config_)
        self._attach(store)
        if mode == "a":
            self._compact()
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def add(self, samples: Iterable, on_progress: Callable[[int], None] | None = None) -> IndexReport:
        """Extract and append the images not yet in the corpus (dedupe by content sha256), then
        update and save the image index. ``on_progress(n)`` is called after each batch of n."""
        self.corpus_, report = add_images(self.corpus_, self._batches(samples), self._extractor, self.options_,
                                          self.config_, on_progress)
        return report

    def remove(self, targets: Iterable[str]) -> dict:
        """Remove normal images from the corpus, named by path (as indexed) or sha256. Opened for
        appending with the file to itself (``mode="a"``), the corpus is rewritten without them
        (whole or not at all) and its image index rebuilt. While other processes read it (a
        service), the removal is recorded beside it (``store/appends.py``): this Spade and every
        reader that refreshes stop retrieving them at once, and the next writer that has the
        file to itself rewrites it (``pending: True``). Returns what was removed; thresholds
        calibrated before are kept and flagged as possibly stale (recalibrate)."""
        store = self.store_
        paths, shas = store.paths(), store.sha256s()
        rows, unknown = resolve(list(targets), paths, shas)
        if unknown:
            raise ValueError(f"{store.path}: not in the corpus (by path or sha256): {unknown[:5]}"
                             + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
        if not rows:
            raise ValueError("remove: name at least one image (a path as indexed, or a sha256)")
        gone = set(self.index_.excluded.tolist()) if self.index_ is not None else set()
        if len(set(rows) | gone) == len(paths):
            raise ValueError(f"{store.path}: removing all {len(paths)} images would leave an empty corpus; "
                             f"delete the file instead")
        path, calibrated = store.path, self.tau_ is not None
        info = {"store": path, "removed": [paths[i] for i in rows], "thresholds_stale": calibrated}
        if store.beside:  # read elsewhere: a record beside it now, the rewrite by the next lone writer
            write_removed(path, {shas[i]: paths[i] for i in rows})
            self.refresh()
            return {**info, "images": self.index_.searchable, "pending": True}
        if not store.writable:
            raise ValueError(f"{store.path}: opened for reading: open it with mode='a' to remove images")
        self.close()
        left = remove_rows(path, rows)
        self.reopen("a")
        self.reindex()
        return {**info, "images": left, "pending": False}

    def rollback(self, generation: int) -> dict:
        """Restore the corpus as it was at ``generation`` (``spade-faiss info`` lists them;
        ``store/generations.py``): rewritten whole from the rows that generation held (a kill
        leaves the old file or the new one), a new generation itself (so it can be rolled back
        too), its image index rebuilt. Needs the corpus to itself (``mode="a"``, nobody reading
        it). Thresholds calibrated since stay and are flagged as possibly stale."""
        store = self.store_
        if store.beside or not store.writable:
            raise ValueError(f"{store.path}: a rollback rewrites the corpus and needs it to itself: open it with "
                             f"mode='a' while no other process (a service) reads it")
        path, calibrated = store.path, self.tau_ is not None
        self.close()
        info = roll_back(path, int(generation))
        self.reopen("a")
        self.reindex()
        return {"store": path, **info, "thresholds_stale": calibrated}

    def _compact(self) -> None:
        """Rewrite the corpus without the images removed beside it while it was read, when this
        Spade has the file to itself (opened for appending); then the record goes."""
        store = self.store_
        if store.beside or not store.writable:
            return
        pending = store.removed()
        if not pending:
            return
        shas = set(store.sha256s())
        present = [s for s in pending if s in shas]
        if present:
            log.info("%s: removing %d image(s) recorded while it was read", store.path, len(present))
            self.remove(present)
        clear_removed(store.path)
        self.refresh()

    def reindex(self) -> dict:
        """Rebuild (and retrain) the image index over all committed rows with the ``index``,
        ``nlist``, ``nprobe``, ``encoding`` and ``seed`` parameters, and save it."""
        self.corpus_ = indexed(self.corpus_, self.options_, self.config_, rebuild=True)
        return self.index_.attrs()

    def refresh(self, until: int | None = None) -> dict:
        """Take in what was committed beside the corpus since it was opened (images appended
        and thresholds calibrated while this process read it, docs/design.md §2 "Growing while
        served"); ``until``: at most that many segments (a state a service reported). Returns
        ``{"added": images, "thresholds_changed": bool, "generation": segments}``."""
        self.corpus_, report = self.corpus_.refreshed(until)
        return report

    # --- thresholds (detector/thresholds.py) ------------------------------------------------

    def calibrate(self, normals: Iterable, fpr: float = DEFAULTS["fpr"], on_progress=None,
                  event_s: float = DEFAULTS["event_s"]) -> dict:
        """Set ``tau_`` and ``theta_`` at false-positive rate ``fpr`` over held-out normal
        images and their pixels, store them in the corpus and return the record. Frames of
        held-out normal videos also choose the temporal smoothing width for events of ``event_s``
        seconds (``record["temporal"]``, :func:`spade_faiss.temporal.choose_sigma`).

        Images already in the corpus are refused: their distances to themselves are 0, which
        would give thresholds that flag every new normal image."""
        check_values({"fpr": fpr, "event_s": event_s})
        results = self.iter_score(normals, maps=True, on_progress=on_progress)
        record = thresholds.calibrate(self.corpus_, results, fpr, self.config_.scoring_dict(), event_s)
        self.corpus_ = self.corpus_.with_thresholds(record)
        return record

    def set_thresholds(self, tau: float | None = None, theta: float | None = None):
        """Override the calibrated thresholds for this object (not stored); None keeps one."""
        self.corpus_ = self.corpus_.with_overrides(tau, theta)
        return self

    def leave_one_out_theta(self, n_images: int = 8, fpr: float = DEFAULTS["fpr"]) -> float:
        """A pixel threshold estimated without held-out images: a calibration-free colour scale
        for pictures (see :func:`spade_faiss.detector.thresholds.leave_one_out_theta`)."""
        self._check_ready()
        return thresholds.leave_one_out_theta(self.corpus_, self.config_, self.options_, self.search_device_,
                                              n_images, fpr)

    # --- what the attached corpus holds, by its public names ------------------------------

    store_ = property(lambda self: self.corpus_.store, doc="The corpus view (file and segments).")
    index_ = property(lambda self: self.corpus_.index, doc="The image index (None: see index_problem_).")
    index_problem_ = property(lambda self: self.corpus_.problem, doc="Why the corpus cannot be scored now.")
    pipeline_ = property(lambda self: self.corpus_.pipeline, doc="The query pipeline (cache, timings).")
    paths_ = property(lambda self: self.corpus_.paths, doc="Image paths by id.")
    calibration_ = property(lambda self: self.corpus_.calibration, doc="The calibration record in force.")
    tau_ = property(lambda self: self.corpus_.tau, doc="The image threshold (None: not calibrated).")
    theta_ = property(lambda self: self.corpus_.theta, doc="The pixel threshold (None: not calibrated).")
    generation_ = property(lambda self: self.corpus_.generation,
                           doc="How many segments appended beside the corpus file this object sees.")

    # --- scoring -------------------------------------------------------------------------

    def iter_score(self, samples: Iterable, *, maps=True, correspondences: bool = False,
                   on_progress=None) -> Iterator[ScoredImage]:
        """Score any number of inputs (paths, dataset samples, RGB uint8 arrays, decoded
        images), decoding ahead in threads and batching the backbone; yields one
        :class:`ScoredImage` per input, in input order (``error`` set for unusable inputs).

        ``maps``: True (stage 2 for every image), False (image scores only: backbone and
        stage 1), or ``"auto"`` (stage 2 only for images above ``tau_``, the paper's gating).
        ``correspondences``: also return, per level and location, the nearest normal patch
        (image id, row, col) of each image that gets a map.
        """
        maps = Maps.from_python(maps)
        self._check_ready(maps)
        for batch in self._batches(samples):
            retrieved = self.retrieve([p for p in batch if p.error is None])
            self.segment([r for r in retrieved if maps is Maps.ALL or (maps is Maps.AUTO and r.score > self.tau_)],
                         correspondences=correspondences)
            done = iter(retrieved)
            for p in batch:
                yield ScoredImage(p.path, p.sample, error=p.error) if p.error else self.result(next(done))
            if on_progress:
                on_progress(len(batch))

    def score(self, samples: Iterable, *, maps=True, correspondences: bool = False) -> SpadeResult:
        """:meth:`iter_score` collected into arrays (see :class:`SpadeResult`)."""
        results = list(self.iter_score(samples, maps=maps, correspondences=correspondences))
        return SpadeResult.collect(results, self.config_.k_gallery, self.crop)

    def _batches(self, samples):
        o, c = self.options_, self.config_
        return images.iter_prepared(samples, o.batch_size, c.resize, c.crop, o.workers)

    def _check_ready(self, maps: Maps = Maps.ALL):
        if getattr(self, "corpus_", None) is None:
            raise ValueError("this Spade is not fitted: call fit(images) or Spade.open(path)")
        self.corpus_.check_ready(maps)
        if self.config_.image_score != "knn" and maps is not Maps.ALL:
            raise ValueError(f"image_score={self.config_.image_score!r} is computed from the map: every image needs "
                             f"one (maps=True, --maps all), or use image_score='knn'")

    def _ks(self) -> tuple[int, int]:
        n = self.index_.searchable if self.index_ is not None else len(self.store_)
        k_gallery = self.config_.k_gallery
        if k_gallery > n:
            if getattr(self, "_clamp_warned_", None) != n:  # once per corpus size, not per batch
                warnings.warn(f"k_gallery={k_gallery} > {n} images in the corpus: using {n}", stacklevel=4)
                self._clamp_warned_ = n
            k_gallery = n
        return min(self.config_.k_image, k_gallery), k_gallery

    def retrieve(self, inputs: list) -> list[Retrieved]:
        """Backbone and stage 1 for a batch of decodable inputs (paths, arrays, decoded images or
        prepared ones); raises ``ValueError`` for an input that cannot be decoded."""
        c = self.config_
        prepared = [p if isinstance(p, images.Prepared) else images.prepare(p, c.resize, c.crop) for p in inputs]
        bad = [p.error for p in prepared if p.error]
        if bad:
            raise ValueError(bad[0])
        return self.pipeline_.retrieve(prepared, *self._ks(), c) if prepared else []

    def segment(self, retrieved: list[Retrieved], correspondences: bool = False) -> None:
        """Stage 2: set ``map`` (and ``correspondences`` when asked) of each retrieved query
        (queries that retrieved the same images share one search over that gallery)."""
        self.pipeline_.segment(retrieved, self.config_, self.options_, self.search_device_, correspondences)
        how = self.config_.image_score
        for r in retrieved:
            if r.map is not None and r.map_score is None:
                r.knn_score = r.score
                r.map_score = scoring.map_score(r.map, "map_top1" if how == "knn" else how)
                if how != "knn":
                    r.score = r.map_score

    def result(self, r: Retrieved) -> ScoredImage:
        """The :class:`ScoredImage` of a retrieved (and possibly segmented) query."""
        if r.error is not None:
            return ScoredImage(r.prepared.path, r.prepared.sample, error=r.error)
        return ScoredImage(r.prepared.path, r.prepared.sample, r.score,
                           None if self.tau_ is None else bool(r.score > self.tau_), r.map, r.neighbour_ids,
                           r.neighbour_distances, [self.paths_[int(i)] for i in r.neighbour_ids[:self._ks()[0]]],
                           r.prepared.image, correspondences=r.correspondences, level_scores=r.level_scores,
                           knn_score=r.score if r.knn_score is None else r.knn_score, map_score=r.map_score)

    def warm_up(self, rounds: int = 2) -> dict[str, float]:
        """Run a generated image through both stages ``rounds`` times (the model, the caches and
        the pruned engine's projections are then ready) and return the last round's seconds:
        ``{"score": backbone and stage 1, "map": stage 2}``."""
        from ..synthetic import texture

        rgb = texture(np.random.default_rng(0), (self.config_.resize, self.config_.resize))
        times = {}
        for _ in range(rounds):
            t = time.perf_counter()
            retrieved = self.retrieve([rgb])
            times["score"] = time.perf_counter() - t
            t = time.perf_counter()
            self.segment(retrieved)
            times["map"] = time.perf_counter() - t
        return times

    def info(self) -> dict:
        """Corpus metadata, the image index, thresholds and the scoring parameters in force."""
        return {**self.store_.describe(), "scoring": self.config_.scoring_dict()}


Spade.__doc__ = Spade.__doc__.replace("{parameters}", parameters_doc().replace("\n", "\n    "))


def convert(src, dst, storage: str, seed: int = DEFAULTS["seed"], on_progress=None) -> dict:
    """Write the corpus ``src`` to ``dst`` with another stored representation (format v2);
    returns the new corpus's description (see :func:`spade_faiss.store.convert`)."""
    PARAM["storage"].check("storage", storage)
    return convert_store(str(src), str(dst), storage, seed, on_progress)


def join(shards: list, out) -> int:
    """One corpus file ``out`` over shard corpora built in parallel (their levels referenced,
    not copied; see :func:`spade_faiss.store.join_shards`); returns its number of images. Build
    its image index with ``Spade.open(out, "a").reindex()``."""
    return join_shards([str(s) for s in shards], str(out))


def describe(path) -> dict:
    """What ``spade-faiss info`` prints about a corpus file (no model is built)."""
    with open_corpus(path) as store:
        return store.describe()
