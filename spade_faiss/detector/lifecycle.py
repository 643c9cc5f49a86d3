"""Which corpus a Spade works on, and keeping it in step: creating and opening corpus files,
adding images, the image index that follows them, and taking in what other processes
committed beside a corpus while it was read (``Spade`` inherits this)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np

from ..image_index import ImageIndex
from ..representations import FIT_IMAGES
from ..results import IndexReport
from ..store import CorpusView, FeatureStore, open_corpus
from .indexing import append_new, new_store
from .pipeline import QueryPipeline

if TYPE_CHECKING:
    from .spade import Spade

log = logging.getLogger(__name__)


class Lifecycle:
    """The corpus half of :class:`~spade_faiss.Spade` (see there for the attributes)."""

    # --- construction --------------------------------------------------------------------

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
            return spade._attach(store)
        except Exception:
            store.close()
            raise

    def fit(self, images_, y=None) -> Spade:
        """Index ``images_`` (paths, dataset samples or RGB uint8 arrays) in an in-memory corpus
        and return self (scikit-learn style)."""
        self._configure()
        self._attach(self._new_store(f"spade-memory-{id(self)}.h5", in_memory=True))
        report = self.add(images_)
        if report.errors:
            raise ValueError("cannot fit: " + "; ".join(r for _, r in report.errors[:5]))
        return self

    def _new_store(self, path, in_memory: bool) -> CorpusView:
        store = new_store(path, self._extractor(), self.config_, self.weights, self.seed, in_memory)
        self.config_ = store.config.replace(**self.config_.scoring_dict())
        return CorpusView(store)

    def _attach(self, store: CorpusView) -> Spade:
        self.store_ = store
        self.index_ = ImageIndex.load(store)
        self.index_problem_, self._index_ahead = None, False
        if self.index_ is None and len(store):
            self.index_problem_ = (f"{store.path}: holds {len(store)} images but no image index: "
                                   f"run `spade-faiss reindex {store.path}`")
        elif self.index_ is not None and self.index_.ntotal > len(store):
            # n_committed lowered (damage): the index knows rows the corpus no longer commits, and
            # an append would overwrite rows the index still returns.
            self.index_problem_ = (f"{store.path}: its image index holds {self.index_.ntotal} images, but only "
                                   f"{len(store)} are committed (a damaged n_committed?): check it with `spade-faiss "
                                   f"verify`; `spade-faiss reindex {store.path}` indexes the committed ones")
            self.index_, self._index_ahead = None, True
        if self.index_ is not None and self.index_.ntotal < len(store):
            if self.index_.ntotal < len(store.base):  # rows committed after the index was saved: a crash
                log.warning("%s: index has %d of %d images; adding the rest", store.path, self.index_.ntotal,
                            len(store.base))
            self.index_.add(store.pool(self.index_.ntotal))  # and the segments' (store/appends.py)
            if store.writable:
                self.index_.save(store)
        self._read_thresholds()
        self.pipeline_ = QueryPipeline(store, self.index_, self._extractor, self.options_.cache_bytes,
                                       self.options_.seed)
        self.paths_ = store.paths()
        return self

    def close(self):
        if getattr(self, "store_", None) is not None:
            self.store_.close()

    def reopen(self, mode: str = "r") -> Spade:
        """Open the same corpus file again after :meth:`close`, keeping the model (a worker that
        must not hold the file between batches); returns self."""
        store = open_corpus(self.store_.path, mode)
        store.check_config(self.config_)
        return self._attach(store)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- indexing ------------------------------------------------------------------------

    def add(self, samples: Iterable, on_progress: Callable[[int], None] | None = None) -> IndexReport:
        """Extract and append the images not yet in the corpus (dedupe by content sha256), then
        update and save the image index. ``on_progress(n)`` is called after each batch of n."""
        if self._index_ahead:
            raise ValueError(self.index_problem_)  # appending would overwrite rows the index returns
        start = time.perf_counter()
        n_before = len(self.store_)
        report = append_new(self.store_, self._batches(samples), self._extractor, self.seed, on_progress)
        if len(self.store_) > n_before or (self.index_ is None and len(self.store_)):
            self._save_index(self.index_ is None)
        report.seconds = time.perf_counter() - start
        return report

    def _save_index(self, rebuild: bool) -> None:
        """Bring the image index up to the corpus (rebuilt, or the new rows added) and save it
        in the corpus file; appends beside a read corpus only add (its readers add them too)."""
        o = self.options_
        if rebuild and self.store_.beside:
            raise ValueError(f"{self.store_.path}: is read by another process; its image index is rebuilt when "
                             f"nothing reads it")
        if rebuild:
            self.index_ = ImageIndex.build(self.store_.pool(), o.index, o.nlist, self.config_.nprobe, o.encoding,
                                           o.seed, o.target_recall, self.config_.k_gallery)
        else:
            self.index_.add(self.store_.pool(self.index_.ntotal))
        if self.store_.writable:
            if not rebuild and self.index_.retune_due:  # only then every pooled vector is read
                self.index_.retune(self.store_.pool(), o.seed, o.target_recall, self.config_.k_gallery)
                log.info("%s: nprobe re-tuned to %d at %d images", self.store_.path, self.index_.nprobe,
                         self.index_.ntotal)
            self.index_.save(self.store_)
        self.index_problem_, self._index_ahead = None, False
        self.pipeline_.index = self.index_
        self.paths_ = self.store_.paths()

    def reindex(self) -> dict:
        """Rebuild (and retrain) the image index over all committed rows with the ``index``,
        ``nlist``, ``nprobe``, ``encoding`` and ``seed`` parameters, and save it."""
        self._save_index(rebuild=True)
        return self.index_.attrs()

    def refresh(self, until: int | None = None) -> dict:
        """Take in what was committed beside the corpus since it was opened (images appended
        and thresholds calibrated while this process read it, docs/design.md §2 "Growing while
        served"); ``until``: at most that many segments (a state a service reported). Returns
        ``{"added": images, "thresholds_changed": bool, "generation": segments}``."""
        new = self.store_.refresh(until)
        if len(new):
            self.index_.add(new)
            self.paths_ = self.store_.paths()
        changed = self.store_.thresholds_changed()
        if changed:
            self._read_thresholds()
        return {"added": len(new), "thresholds_changed": changed, "generation": self.generation_}

    @property
    def generation_(self) -> int:
        """How many segments appended beside the corpus file this object sees (0: the file alone)."""
        return self.store_.segments

    def _read_thresholds(self) -> None:
        self.calibration_ = self.store_.thresholds()
        self.tau_ = self.calibration_["tau"] if self.calibration_ else None
        self.theta_ = self.calibration_["theta"] if self.calibration_ else None

