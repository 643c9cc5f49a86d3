"""A corpus as a process sees it: the corpus file, then the segments appended beside it while
it was served (``appends.py``), as one sequence of images with stable ids.

Image ids run through the corpus file's committed rows, then each segment's rows whose sha256
is new, in segment order; :meth:`CorpusView.refresh` adds segments committed since. Every
reader sees the same ids for the same segments, and the merge that later moves them into the
corpus file keeps those ids, so scores are bitwise the same before and after.
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np

from . import appends, names
from .corpus import CorpusLocked, FeatureStore, StoreError

log = logging.getLogger(__name__)


class CorpusView:
    """Read access to a corpus and its segments, and appends: into the corpus file when this
    process has it to itself, else (``beside``) as new segments. Its interface is what the
    layers above use of a corpus, each method written out (the configuration, the fitted
    representations, the records are the corpus file's own)."""

    def __init__(self, base: FeatureStore, beside: bool = False, lock: appends.WriterLock | None = None,
                 generation: int | None = None):
        self.base, self.beside, self.lock = base, beside, lock
        self.parts: list[FeatureStore] = [base]
        self.rows: list[np.ndarray] = [np.arange(len(base), dtype=np.int64)]  # rows of each part in the view
        self.starts = [0]
        self._paths, self._shas = base.paths(), base.sha256s()
        self._known = set(self._shas)
        self._mtimes: dict[str, int | None] = {}  # files beside the corpus, as last seen
        self.segments = 0
        try:
            self.refresh(generation)
        except BaseException:  # a refused segment: nothing this view opened stays open (or locked)
            self.close()
            raise
        self.thresholds_changed()

    # --- the corpus file's own answers (configuration, representations, image index, estimates) ---

    path = property(lambda self: self.base.path)
    config = property(lambda self: self.base.config)
    feature_shapes = property(lambda self: self.base.feature_shapes)
    representations = property(lambda self: self.base.representations)
    level_shapes = property(lambda self: self.base.level_shapes)
    pool_dim = property(lambda self: self.base.pool_dim)
    needs_fit = property(lambda self: self.base.needs_fit)
    input_dtype = property(lambda self: self.base.input_dtype)

    def weights_source(self) -> dict:
        return self.base.weights_source()

    def check_config(self, config) -> None:
        self.base.check_config(config)

    def fit_representations(self, feats: dict, seed: int) -> None:
        self.base.fit_representations(feats, seed)

    def adopt_representations(self, other: FeatureStore) -> None:
        self.base.adopt_representations(other)

    @property
    def records(self):
        """The corpus file's records (image index, thresholds, projections: ``records.py``);
        :meth:`thresholds` is the view's answer, a thresholds file beside the corpus first."""
        return self.base.records

    def __len__(self) -> int:
        return len(self._paths)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- growing -------------------------------------------------------------------------

    @property
    def writable(self) -> bool:
        """Whether appends and the image index go into the corpus file itself."""
        return not self.beside and self.base.h5.mode == "r+"

    def refresh(self, until: int | None = None) -> np.ndarray:
        """Add the segments committed since the last call (up to ``until`` segments in all);
        returns the pooled vectors of the images they add, float32 (n, D), in id order."""
        new = []
        for path in appends.segment_paths(self.base.path)[self.segments:until]:
            try:
                seg = FeatureStore.open(path)
            except FileNotFoundError:
                break  # merged meanwhile by a writer that had the corpus file to itself
            try:
                self._check_segment(seg)
            except BaseException:
                seg.close()
                raise
            shas = seg.sha256s()
            keep = np.array([i for i, s in enumerate(shas) if s not in self._known], dtype=np.int64)
            self._known.update(shas)
            self.parts.append(seg)
            self.rows.append(keep)
            self.starts.append(len(self._paths))
            paths = seg.paths()
            self._paths += [paths[i] for i in keep]
            self._shas += [shas[i] for i in keep]
            self.segments += 1
            if len(keep):
                new.append(seg.pool()[keep])
        return np.concatenate(new) if new else np.empty((0, self.base.pool_dim), np.float32)

    def _check_segment(self, seg: FeatureStore) -> None:
        problem = segment_problem(self.base, seg)
        if problem:
            seg.close()
            raise StoreError(problem)

    def thresholds_unread(self) -> None:
        """The thresholds file changed but could not be read: ask again at the next call."""
        self._mtimes.pop(appends.THRESHOLDS, None)

    def removed(self) -> dict[str, str]:
        """Images removed beside the corpus, not compacted yet (``appends.read_removed``)."""
        return appends.read_removed(self.base.path)

    def removed_ids(self) -> np.ndarray:
        """The view's ids of the removed images (int64, ascending): retrieval excludes them."""
        gone = set(self.removed())
        return np.array([i for i, s in enumerate(self._shas) if s in gone], dtype=np.int64)

    def removed_changed(self) -> bool:
        """Whether the removal record beside the corpus changed since the last call."""
        return self._changed(appends.REMOVED)

    def thresholds_changed(self) -> bool:
        """Whether the thresholds file beside the corpus changed since the last call."""
        return self._changed(appends.THRESHOLDS)

    def _changed(self, name: str) -> bool:
        """Whether file ``name`` beside the corpus changed (its mtime) since the last call."""
        try:
            mtime = os.stat(appends.appends_dir(self.base.path) / name).st_mtime_ns
        except FileNotFoundError:
            mtime = None
        changed, self._mtimes[name] = mtime != self._mtimes.get(name, "unread"), mtime
        return changed

    # --- reading -------------------------------------------------------------------------

    def paths(self) -> list[str]:
        return list(self._paths)

    def sha256s(self) -> list[str]:
        return list(self._shas)

    def _locate(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.asarray(self.starts), ids, side="right") - 1

    def pool(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = len(self) if stop is None else min(stop, len(self))
        if len(self.parts) == 1:
            return self.base.pool(start, stop)
        ids = np.arange(start, max(start, stop), dtype=np.int64)

        def read(part, rows):  # one range per part
            lo = int(rows.min())
            return part.pool(lo, int(rows.max()) + 1)[rows - lo]

        return self._gather(ids, read, (self.base.pool_dim,), np.float32)

    def level(self, name: str, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"image ids must lie in [0, {len(self)}), got {ids.min()}..{ids.max()}")
        if len(self.parts) == 1:
            return self.base.level(name, ids)
        shape = self.base.level_shapes[name]
        return self._gather(ids, lambda part, rows: part.level(name, rows), shape, None)

    def stored_level(self, name: str, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        ds = self.base.stored_dataset(name)
        return self._gather(ids, lambda part, rows: part.stored_level(name, rows), ds.shape[1:], ds.dtype)

    def _gather(self, ids: np.ndarray, read, shape, dtype) -> np.ndarray:
        """``read(part, local rows)`` for the ids of each part, assembled in ``ids`` order."""
        which = self._locate(ids) if ids.size else ids
        out = None
        for p in np.unique(which):
            sel = np.flatnonzero(which == p)
            block = read(self.parts[p], self.rows[p][ids[sel] - self.starts[p]])
            if out is None:
                out = np.empty((len(ids), *block.shape[1:]), dtype or block.dtype)
            out[sel] = block
        return out if out is not None else np.empty((0, *shape), dtype or np.float32)

    @property
    def bytes_read(self) -> int:
        return sum(p.bytes_read for p in self.parts)

    def thresholds(self) -> dict | None:
        beside = appends.read_thresholds(self.base.path)
        return beside if beside is not None else self.base.records.thresholds()

    def describe(self) -> dict:
        return {**self.base.describe(), "images": len(self), "segments": self.segments,
                "thresholds": self.thresholds()}

    # --- writing -------------------------------------------------------------------------

    def append(self, paths, sha256s, feats: dict, encoded: bool | set = False) -> np.ndarray:
        """Commit a batch: into the corpus file, or (``beside``) as a new segment."""
        if not self.beside:
            ids = self.base.append(paths, sha256s, feats, encoded)
            self._paths += list(paths)
            self._shas += list(sha256s)
            self._known.update(sha256s)
            self.rows[0] = np.arange(len(self.base), dtype=np.int64)
            return ids
        final = appends.next_segment_path(self.base.path)
        tmp = names.temporary(final)
        try:
            seg = FeatureStore.create(tmp, self.base.config, self.base.feature_shapes, self.base.pool_dim,
                                      weights_source=self.base.weights_source(), like=self.base)
            try:
                seg.mark_segment(self.base.corpus_id, names.segment_number(final), len(self.base))
                seg.adopt_representations(self.base)
                seg.append(paths, sha256s, feats, encoded)
            finally:
                seg.close()
            os.replace(tmp, final)
        except (OSError, StoreError) as e:  # a full disk, a file-size limit: say which corpus, leave nothing
            if os.path.exists(tmp):
                os.remove(tmp)
            raise StoreError(f"{self.base.path}: a batch of {len(paths)} image(s) could not be committed beside it "
                             f"as {final} ({e}); nothing was committed (the corpus and its other segments are "
                             f"intact)") from None
        start = len(self)
        self.refresh()
        return np.arange(start, len(self), dtype=np.int64)

    def write_thresholds(self, thresholds: dict) -> None:
        if self.beside:
            appends.write_thresholds(self.base.path, thresholds)
        else:
            self.base.records.write_thresholds(thresholds)

    def close(self) -> None:
        for p in self.parts:
            p.close()
        if self.lock is not None:
            self.lock.release()


def segment_problem(base: FeatureStore, seg: FeatureStore) -> str | None:
    """Why ``seg`` cannot be read as a segment of corpus ``base`` (None: it can): it extends
    another corpus (or is a corpus file of its own), its recorded number is not its name's,
    it was written for more rows than the corpus file has (the file was replaced by an older
    copy), or its configuration or fitted representations differ. Corpora made before 0.3.1
    have no id: their segments are checked for the configuration only."""
    away = f"; move it out of {os.path.dirname(seg.path)} to use the corpus without it"
    ident = seg.segment_identity()
    if base.corpus_id is not None:
        of = ident.get(names.SEGMENT_OF)
        if of != base.corpus_id:
            what = f"it extends corpus {of}" if of else "it is a corpus file of its own"
            return f"{seg.path}: not a segment of {base.path} ({what}; this corpus is {base.corpus_id}){away}"
        number = names.segment_number(seg.path)
        if ident.get(names.SEGMENT_NUMBER) != number:
            return (f"{seg.path}: out of sequence (it was written as segment {ident.get(names.SEGMENT_NUMBER)}, "
                    f"it is named {number}){away}")
        if ident.get(names.BASE_ROWS, 0) > len(base):
            return (f"{seg.path}: written beside {ident[names.BASE_ROWS]} committed images, {base.path} has "
                    f"{len(base)}: the corpus file was replaced by an older copy{away}")
    if seg.config.feature_dict() != base.config.feature_dict():
        return f"{seg.path}: built with another configuration than {base.path}{away}"
    for lv, rep in base.representations.items():
        theirs = seg.representations[lv].state or {}
        if any(not np.array_equal(v, theirs.get(k)) for k, v in (rep.state or {}).items()):
            return f"{seg.path}: its {lv} representation is fitted differently from {base.path}'s{away}"
    return None


def merge_segments(base: FeatureStore) -> int:
    """Move the segments beside ``base`` (opened for appending, so nobody reads it) into it:
    new rows copied as stored, in segment order; returns how many images were added."""
    seg_paths = appends.segment_paths(base.path)
    beside = appends.read_thresholds(base.path)
    if not seg_paths and beside is None:
        return 0
    for path in seg_paths:  # every segment checked before any is merged: a refused one stops the whole merge
        with FeatureStore.open(path) as seg:
            problem = segment_problem(base, seg)
        if problem:
            raise StoreError(problem)
    known, added = set(base.sha256s()), 0
    for path in seg_paths:
        with FeatureStore.open(path) as seg:
            shas = seg.sha256s()
            keep = [i for i, s in enumerate(shas) if s not in known]
            known.update(shas)
            if keep:
                paths = seg.paths()
                feats = {"pool": seg.pool()[keep], **{lv: seg.stored_level(lv, keep) for lv in base.config.levels}}
                base.append([paths[i] for i in keep], [shas[i] for i in keep], feats, encoded=True)
                added += len(keep)
    if beside is not None:
        base.records.write_thresholds(beside)
    appends.remove_temporaries(base.path)
    appends.clear(base.path)
    log.info("%s: merged %d segment(s), %d image(s)", base.path, len(seg_paths), added)
    return added


def left_behind(base: FeatureStore) -> tuple[str, int] | None:
    """Segments of ``base`` committed beside the path its last writer closed it at, while
    nothing is beside it here: ``(that path, how many images they hold)`` (None: none seen).
    A corpus file moved (or copied) without its ``.appends/`` finds them this way."""
    recorded, here = base.attrs.get(names.WRITTEN_AT), os.path.realpath(base.path)
    if not recorded or str(recorded) == here or base.corpus_id is None or appends.segment_paths(here):
        return None
    images = 0
    for path in appends.segment_paths(str(recorded)):
        try:
            with FeatureStore.open(path, "r") as seg:
                if seg.segment_identity().get(names.SEGMENT_OF) == base.corpus_id:
                    images += len(seg)
        except (OSError, StoreError, CorpusLocked):
            continue  # not readable now: not counted
    return (str(recorded), images) if images else None


def check_left_behind(base: FeatureStore) -> None:
    """Refuse a corpus file moved away from the segments holding some of its images (the
    original gone: they would be lost for good once a writer records the new place); warn for a
    copy (the original still has them)."""
    found = left_behind(base)
    if found is None:
        return
    old, images = found
    folder = names.appends_dir(old)
    try:
        with FeatureStore.open(old, "r") as original:
            copy = original.corpus_id == base.corpus_id
    except CorpusLocked:
        copy = True  # being written: the original is there
    except (OSError, StoreError):
        copy = False
    if copy:
        warnings.warn(f"{base.path}: a copy of {old} without the {images} image(s) appended beside it ({folder}): "
                      f"it holds the corpus as it was before them", stacklevel=3)
        return
    raise StoreError(f"{base.path}: {images} image(s) of this corpus were appended beside it at {old} and are "
                     f"still in {folder}, which was not moved with it: move that folder beside it "
                     f"(mv {folder} {names.appends_dir(base.path)})")


def open_corpus(path, mode: str = "r", generation: int | None = None) -> CorpusView:
    """Open corpus ``path`` with its segments (the first ``generation`` of them: a state a
    service reported). ``mode="a"``: append into the file when this process can have it to
    itself (merging the segments first), else beside it. A corpus file moved without the
    segments holding some of its images is refused (:func:`left_behind`)."""
    if mode != "a":
        base = FeatureStore.open(path, mode)
        try:
            check_left_behind(base)
        except BaseException:
            base.close()
            raise
        return CorpusView(base, generation=generation)
    try:
        base = FeatureStore.open(path, "a")
    except CorpusLocked as busy:
        try:
            base = FeatureStore.open(path, "r")  # read by others (serve, score): append beside it
        except CorpusLocked:
            raise busy from None
        try:
            if not len(base):  # its first append fits the representations and builds the image index
                raise StoreError(f"{path}: an empty corpus cannot grow while it is read elsewhere; stop the "
                                 f"readers for its first append")
            check_left_behind(base)
            lock = appends.WriterLock(path)
        except BaseException:
            base.close()
            raise
        appends.remove_temporaries(path)
        return CorpusView(base, beside=True, lock=lock)
    try:
        check_left_behind(base)
        merge_segments(base)
    except BaseException:
        base.close()
        raise
    return CorpusView(base)
