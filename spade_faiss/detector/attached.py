"""The attached corpus: everything a Spade answers from, as one value.

An :class:`AttachedCorpus` holds the corpus view (the file and its segments), the image index
kept in step with it (or why there is none), the query pipeline (gallery cache, timings,
projections), the image paths by id and the thresholds in force. :func:`attach` builds it; a
Spade replaces it whole (create, open, fit, reopen, add, refresh, calibrate), so a service
that swaps it between jobs never sees half of a change.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from ..config import Maps
from ..image_index import ImageIndex
from ..memory import MemoryBudget
from ..store import CorpusView
from .pipeline import QueryPipeline

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AttachedCorpus:
    """One corpus as a Spade answers from it (replace it whole; never mutate a field).

    ``problem``: why the corpus cannot be scored now (no image index, or one ahead of the
    committed rows); ``index_ahead``: that second case, where an append would overwrite rows the
    index still returns. ``tau``/``theta``: the thresholds in force (the calibration record's,
    or an override); ``memo``: values computed from this state (the leave-one-out colour scale).
    """

    store: CorpusView
    index: ImageIndex | None
    pipeline: QueryPipeline
    paths: list[str]
    calibration: dict | None
    tau: float | None
    theta: float | None
    problem: str | None = None
    index_ahead: bool = False
    memo: dict = dataclasses.field(default_factory=dict, compare=False)

    @property
    def generation(self) -> int:
        """How many segments appended beside the corpus file this state includes."""
        return self.store.segments

    def check_ready(self, maps: Maps = Maps.ALL) -> None:
        """Raise ``ValueError`` unless queries can be answered (with ``maps``) from this state."""
        if self.problem:
            raise ValueError(self.problem)
        if self.index is None or len(self.store) == 0:
            raise ValueError(f"{self.store.path}: the corpus holds no images")
        if maps is Maps.AUTO and self.tau is None:
            raise ValueError("maps='auto' gates stage 2 on the image threshold: calibrate first")

    def with_thresholds(self, calibration: dict | None) -> AttachedCorpus:
        """This state with the calibration record ``calibration`` in force."""
        tau, theta = (calibration["tau"], calibration["theta"]) if calibration else (None, None)
        return dataclasses.replace(self, calibration=calibration, tau=tau, theta=theta)

    def with_overrides(self, tau: float | None, theta: float | None) -> AttachedCorpus:
        """This state with ``tau``/``theta`` overridden (None keeps one; not stored)."""
        return dataclasses.replace(self, tau=self.tau if tau is None else float(tau),
                                   theta=self.theta if theta is None else float(theta))

    def with_index(self, index: ImageIndex) -> AttachedCorpus:
        """This state with ``index`` brought up to every committed row (and the paths read again)."""
        self.pipeline.index = index
        return dataclasses.replace(self, index=index, paths=self.store.paths(), problem=None, index_ahead=False,
                                   memo={})

    def refreshed(self, until: int | None = None) -> tuple[AttachedCorpus, dict]:
        """Take in what was committed beside the corpus (segments, thresholds) since this state:
        the new state and ``{"added", "thresholds_changed", "generation"}``."""
        changed = self.store.thresholds_changed()
        calibration = self.calibration
        if changed:  # read first: a record that cannot be read changes nothing (and is read again next time)
            try:
                calibration = self.store.thresholds()
            except ValueError:
                self.store.thresholds_unread()
                raise
        new = self.store.refresh(until)
        state = self
        if len(new):
            self.index.add(new)
            state = dataclasses.replace(state, paths=self.store.paths(), memo={})
        if (self.store.removed_changed() or len(new)) and self.index is not None:
            self.index.exclude(self.store.removed_ids())  # removed while served: never retrieved again
            state = dataclasses.replace(state, memo={})
        if changed:
            state = state.with_thresholds(calibration)
        return state, {"added": len(new), "thresholds_changed": changed, "generation": state.generation}

    def close(self) -> None:
        self.store.close()


def attach(store: CorpusView, extractor: Callable, budget: MemoryBudget, seed: int,
           spill_bytes: int = 0) -> AttachedCorpus:
    """The attached state of ``store``: its image index loaded (and brought up to the committed
    rows and the segments' when behind), the query pipeline (its gallery cache spilling up to
    ``spill_bytes`` to disk), the paths and the thresholds."""
    index = ImageIndex.load(store)
    problem, ahead = None, False
    if index is None and len(store):
        problem = f"{store.path}: holds {len(store)} images but no image index: run `spade-faiss reindex {store.path}`"
    elif index is not None and index.ntotal > len(store):
        # n_committed lowered (damage): the index knows rows the corpus no longer commits, and
        # an append would overwrite rows the index still returns.
        problem = (f"{store.path}: its image index holds {index.ntotal} images, but only {len(store)} are committed "
                   f"(a damaged n_committed?): check it with `spade-faiss verify`; `spade-faiss reindex "
                   f"{store.path}` indexes the committed ones")
        index, ahead = None, True
    if index is not None and index.ntotal < len(store):
        if index.ntotal < len(store.base):  # rows committed after the index was saved: a crash
            log.warning("%s: index has %d of %d images; adding the rest", store.path, index.ntotal, len(store.base))
        index.add(store.pool(index.ntotal))  # and the segments' (store/appends.py)
        if store.writable:
            index.save(store)
    store.removed_changed()
    if index is not None:
        index.exclude(store.removed_ids())  # images removed beside the corpus and not compacted yet
    pipeline = QueryPipeline(store, index, extractor, budget, seed, spill_bytes)
    state = AttachedCorpus(store, index, pipeline, store.paths(), None, None, None, problem, ahead)
    return state.with_thresholds(store.thresholds())
