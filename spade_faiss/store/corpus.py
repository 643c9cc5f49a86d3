"""FeatureStore: one open corpus file, format v2 (docs/design.md, "The corpus file"; v1 files
are read and appended to as before): creation, validation, reads and crash-safe appends. No
torch here.

Format v2 adds, per level, a stored representation (``representations.py``: float16/float32,
lossless, or pca codes with their fitted arrays under ``representations/<level>``), the
features' shape per level (``feature_shapes``), and a fletcher32 checksum on every level
row (and per-image digests of every part: ``digests.py``; ``layout.py`` says which chunks carry
no checksum, and why).

Crash safety: an append resizes the datasets, writes the rows, flushes, and only then bumps
``n_committed``. Rows past ``n_committed`` are leftovers of a crash: ignored by readers and
overwritten by the next append.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import uuid
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  registers the lossless filters with HDF5: every reader can decode them
import numpy as np

from ..clock import utc_now
from ..config import SpadeConfig, feature_mismatch, upgrade_feature_dict
from ..representations import Representation
from ..version import __version__
from . import appends, digests, errors, generations, names
from .errors import CorpusLocked, StoreError
from .layout import SHA_DTYPE, level_specs, write_layout, write_representations
from .records import Records
from .repair import rebuild

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Room an append asks for besides its rows: per image (its path, B-tree nodes), per batch (heaps, the flush).
ROW_OVERHEAD_BYTES = 4096
METADATA_MARGIN_BYTES = 1 << 20


def _plain(attrs: dict) -> dict:
    """HDF5 attribute values (numpy scalars and strings) as JSON-ready Python values."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in attrs.items()}


class FeatureStore:
    """An open corpus file. Use :meth:`create` or :meth:`open`; closes on ``with`` exit.

    Attributes
    ----------
    path : str
    config : SpadeConfig
        The configuration the features were extracted with (feature half only).
    feature_shapes : dict of str -> (h, w, C)
        The backbone's features per level.
    representations : dict of str -> Representation
        How each level is stored (``representations.py``).
    level_shapes : dict of str -> (h, w, C')
        What :meth:`level` returns per image: the representation's search space.
    pool_dim : int
    """

    def __init__(self, h5: h5py.File, path: str):
        self.h5 = h5
        self.path = path
        self._validate()
        self.config = SpadeConfig(**self.raw_config())
        self.feature_shapes = self._feature_shapes()
        self.representations = self._representations()
        self.level_shapes = {lv: (*self.feature_shapes[lv][:2], r.search_channels)
                             for lv, r in self.representations.items()}
        self.pool_dim = int(self.h5[names.POOL].shape[1])
        self.records = Records(h5, path)
        self.bytes_read = 0  # stored bytes of the level rows read so far (compressed size when compressed)

    def _feature_shapes(self) -> dict:
        if names.FEATURE_SHAPES in self.h5.attrs:
            return {lv: tuple(v) for lv, v in json.loads(self.h5.attrs[names.FEATURE_SHAPES]).items()}
        return {lv: tuple(self.h5[names.LEVELS][lv].shape[1:]) for lv in self.config.levels}  # format v1

    def _representations(self) -> dict[str, Representation]:
        fitted = self.h5.get(names.REPRESENTATIONS)
        out = {}
        for lv, name in self.config.storage_per_level().items():
            state = None
            if fitted is not None and lv in fitted:
                state = {k: self._read(names.representation(lv, k), ()) for k in ("mean", "basis", "step")}
            rep = Representation(name, self.feature_shapes[lv][2], state)
            if rep.is_pca:  # the exponent channel: written since 0.3.2 (representations.py)
                rep.exponent = self.h5[names.LEVELS][lv].shape[-1] == rep.dims + 1
            out[lv] = rep
        return out

    # --- opening -------------------------------------------------------------------------

    @classmethod
    def create(cls, path, config: SpadeConfig, level_shapes: dict, pool_dim: int, in_memory: bool = False,
               weights_source: dict | None = None, like: FeatureStore | None = None) -> FeatureStore:
        """A new, empty corpus; ``in_memory`` keeps it in RAM only (for ``Spade.fit``).
        ``weights_source`` records where the backbone weights came from (for later opens).
        ``like``: store rows as that corpus does (a segment of it: the same stored channels)."""
        path = str(path)
        shapes = {lv: tuple(int(x) for x in level_shapes[lv]) for lv in config.levels}
        attrs = dict(format_version=FORMAT_VERSION, library_version=__version__, created=utc_now(),
                     corpus_id=uuid.uuid4().hex,
                     config=json.dumps(config.feature_dict(), sort_keys=True),
                     weights_source=json.dumps(weights_source or {}, sort_keys=True),
                     feature_shapes=json.dumps(shapes, sort_keys=True), generations="[]")
        reps = {lv: Representation(name, shapes[lv][2]) for lv, name in config.storage_per_level().items()}
        for lv, r in reps.items():
            if like is not None and lv in like.representations:
                r.exponent = like.representations[lv].exponent
        specs = level_specs(reps, shapes)
        if in_memory:
            h5 = h5py.File(path, "w", driver="core", backing_store=False)
            write_layout(h5, attrs, specs, pool_dim)
            return cls(h5, path)
        if os.path.exists(path):
            raise FileExistsError(f"{path}: already exists (open it to append, or choose a new name)")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Written whole under a temporary name, then renamed: a crash leaves no half-made corpus.
        for left in names.abandoned_temporaries(path):  # a creation killed before
            os.remove(left)
        orphans = appends.set_aside_orphans(path, attrs["created"].replace(":", ""))
        if orphans is not None:
            log.warning("%s: a segments folder of a deleted corpus of that name was beside it; set aside as %s "
                        "(never adopted)", path, orphans)
        tmp = names.temporary(path)
        with h5py.File(tmp, "w") as h5:
            write_layout(h5, attrs, specs, pool_dim)
        os.replace(tmp, path)
        store = cls(h5py.File(path, "r+"), path)
        store._mark_writer()
        return store

    @classmethod
    def open(cls, path, mode: str = "r") -> FeatureStore:
        """Open an existing corpus, ``mode`` ``"r"`` (read) or ``"a"`` (append)."""
        path = str(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode={mode!r}: expected 'r' or 'a'")
        if os.path.isdir(path):
            raise FileNotFoundError(f"{path}: is a folder; expected a corpus file (e.g. {path.rstrip('/')}/NAME.h5)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such corpus file (build one with `spade-faiss index`)")
        try:
            h5 = h5py.File(path, "r" if mode == "r" else "r+")
        except OSError as e:
            # HDF5 locks files: one writer excludes everyone, readers share (documented in README);
            # within one process, HDF5 refuses to open for writing a file it has open for reading.
            if "unable to lock file" in str(e) or "already open for read-only" in str(e):
                raise CorpusLocked(f"{path}: is being written by another process (HDF5 file lock); "
                                   f"retry when it has finished") from None
            raise StoreError(f"{path}: not a readable HDF5 corpus ({e})") from None
        try:
            store = cls(h5, path)
        except StoreError:
            h5.close()
            raise
        except Exception as e:  # h5py raises KeyError/OSError/... on damaged metadata
            h5.close()
            raise StoreError(f"{path}: damaged HDF5 structure ({type(e).__name__}: {e})") from None
        if mode == "a":  # the writer now: what a killed rewrite of this corpus left is nobody's
            for left in names.abandoned_temporaries(path):
                os.remove(left)
        if mode == "a" and store.last_writer_died:
            store.close()
            rebuild(path)
            return cls.open(path, mode)
        if mode == "a":
            store._mark_writer()
        return store

    @property
    def corpus_id(self) -> str | None:
        """The id written at creation (None: a corpus made before 0.3.1)."""
        value = self.h5.attrs.get(names.CORPUS_ID)
        return None if value is None else str(value)

    def segment_identity(self) -> dict:
        """What a segment records of the corpus it extends (empty for a corpus file)."""
        a = self.h5.attrs
        return {k: (str(a[k]) if k == names.SEGMENT_OF else int(a[k]))
                for k in (names.SEGMENT_OF, names.SEGMENT_NUMBER, names.BASE_ROWS) if k in a}

    def mark_segment(self, of: str | None, number: int, base_rows: int) -> None:
        """Record that this file is segment ``number`` of corpus ``of`` (written when it had ``base_rows``)."""
        if of is not None:
            self.h5.attrs[names.SEGMENT_OF] = of
        self.h5.attrs[names.SEGMENT_NUMBER] = number
        self.h5.attrs[names.BASE_ROWS] = base_rows

    @property
    def last_writer_died(self) -> bool:
        """Whether the last writer did not close the file (a crash): the next writer rebuilds it."""
        return bool(int(self.h5.attrs.get(names.WRITER, 0)))

    def _mark_writer(self, open_: bool = True) -> None:
        """While a writer has the file, ``writer`` is 1; a writer that finds it 1 rebuilds the
        file first (``repair.py``)."""
        if self.h5.driver != "core":
            self.h5.attrs[names.WRITER] = int(open_)
            self.h5.flush()

    def _validate(self):
        attrs = self.h5.attrs
        for key in (names.FORMAT_VERSION, names.CONFIG, names.N_COMMITTED):
            if key not in attrs:
                raise StoreError(f"{self.path}: missing attribute {key!r}: not a spade_faiss corpus")
        if int(attrs[names.FORMAT_VERSION]) not in READABLE_VERSIONS:
            raise StoreError(f"{self.path}: format_version {attrs['format_version']}, "
                             f"this library reads {list(READABLE_VERSIONS)}")
        levels = self.raw_config()["levels"]
        needed = [names.PATHS, names.SHA256, names.POOL, names.INDEX] + [names.level(lv) for lv in levels]
        for name in needed:
            if name not in self.h5:
                raise StoreError(f"{self.path}: missing dataset {name!r}")
        n = int(attrs[names.N_COMMITTED])
        for name in needed[:3] + needed[4:]:
            if self.h5[name].shape[0] < n:
                raise StoreError(f"{self.path}: {name} has {self.h5[name].shape[0]} rows, "
                                 f"n_committed is {n}")

    def check_config(self, config: SpadeConfig) -> None:
        """Refuse a configuration whose feature half differs from the store's."""
        diff = feature_mismatch(self.config.feature_dict(), config.feature_dict())
        if diff:
            raise StoreError(f"{self.path} was built with another configuration ({'; '.join(diff)}); "
                             f"leave these options out to use the store's own, or build a new corpus")

    def close(self):
        if self.h5.id.valid:
            if self.h5.mode == "r+":
                if self.h5.driver != "core":
                    generations.record_current(self.h5)  # what this writer committed: a generation
                    here = os.path.realpath(names.final_name(self.path))  # where its segments go
                    if self.h5.attrs.get(names.WRITTEN_AT) != here:
                        self.h5.attrs[names.WRITTEN_AT] = here
                self._mark_writer(False)
            self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return int(self.h5.attrs[names.N_COMMITTED])

    # --- reading -------------------------------------------------------------------------

    def _read(self, name: str, selection):
        return errors.read(self.h5, self.path, name, selection)

    @property
    def attrs(self) -> dict:
        return dict(self.h5.attrs)

    def raw_config(self) -> dict:
        """The stored feature configuration (JSON; format v1's ``dtype`` read as ``storage``),
        before validation."""
        return upgrade_feature_dict(json.loads(self.h5.attrs[names.CONFIG]))

    def weights_source(self) -> dict:
        """Where the weights came from at creation: ``{"weights": ..., "seed": ...}`` or {}."""
        return json.loads(self.h5.attrs.get(names.WEIGHTS_SOURCE, "{}"))

    def paths(self) -> list[str]:
        return [p.decode("utf-8") if isinstance(p, bytes) else p
                for p in self._read(names.PATHS, np.s_[: len(self)])]

    def sha256s(self) -> list[str]:
        return [s.decode("ascii", "replace") for s in self._read(names.SHA256, np.s_[: len(self)])]

    def mismatched_names(self) -> list[int]:
        """Rows whose stored path or sha256 differs from its recorded digest (``digests.py``)."""
        return digests.names_mismatched(self.h5, self.paths(), self.sha256s())

    def pool(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Pooled vectors of rows ``start:stop`` (default all committed), float32 (n, D)."""
        stop = len(self) if stop is None else min(stop, len(self))
        rows = self._read(names.POOL, np.s_[start:stop])
        self._check_digests(names.POOL_PART, np.arange(start, max(start, stop)), rows)
        return rows

    def level(self, name: str, ids) -> np.ndarray:
        """Feature maps of image ``ids`` at ``name``, stored dtype, (len(ids), h, w, C).

        Rows are read in ascending id order (one chunk each) and returned in the given order.
        """
        ids = np.asarray(ids, dtype=np.int64)
        n = len(self)
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise IndexError(f"image ids must lie in [0, {n}), got {ids.min()}..{ids.max()}")
        ds = self.h5[names.LEVELS][name]
        out = np.empty((len(ids), *ds.shape[1:]), dtype=ds.dtype)
        for k in np.argsort(ids, kind="stable"):
            try:
                ds.read_direct(out, np.s_[int(ids[k])], np.s_[int(k)])
            except OSError as e:
                raise errors.damaged(self.path, names.level(name), f"row {int(ids[k])}", e) from None
        self.bytes_read += self._stored_bytes(ds, ids)
        self._check_digests(name, ids, out)
        return self.representations[name].decode(out)

    def stored_dataset(self, name: str) -> h5py.Dataset:
        """The dataset of level ``name``'s stored rows (its shape and dtype)."""
        return self.h5[names.LEVELS][name]

    def stored_level(self, name: str, ids) -> np.ndarray:
        """The stored rows of :meth:`level` before decoding (codes for pca), for copies."""
        ds = self.h5[names.LEVELS][name]
        if not len(ids):
            return np.empty((0, *ds.shape[1:]), ds.dtype)
        rows = np.stack([ds[int(i)] for i in ids])
        self._check_digests(name, np.asarray(ids, dtype=np.int64), rows)
        return rows

    @staticmethod
    def _stored_bytes(ds: h5py.Dataset, ids: np.ndarray) -> int:
        """Bytes the rows ``ids`` of ``ds`` take on disk: their compressed chunks' sizes (one
        chunk per row, looked up by coordinate), else their raw size."""
        if ds.is_virtual or not ds.compression:
            return len(ids) * int(np.prod(ds.shape[1:])) * ds.dtype.itemsize
        origin = (0,) * (ds.ndim - 1)
        return sum(ds.id.get_chunk_info_by_coord((int(i), *origin)).size for i in ids)

    def _row_bytes(self, name: str) -> int:
        """Stored bytes of one row of level ``name`` (the mean over committed rows when compressed)."""
        ds = self.h5[names.LEVELS][name]
        raw = int(np.prod(ds.shape[1:])) * ds.dtype.itemsize
        if ds.is_virtual or not ds.compression or not len(self):
            return raw
        return int(ds.id.get_storage_size() / max(1, ds.shape[0]))

    def describe(self) -> dict:
        """What ``spade-faiss info`` prints: metadata, shapes, the index's attributes, thresholds."""
        attrs = self.attrs
        return {"store": self.path, "format_version": int(attrs[names.FORMAT_VERSION]),
                "library_version": str(attrs.get("library_version")), "created": str(attrs.get("created")),
                "images": len(self), "bytes": self.nbytes_on_disk(), "bytes_per_image": self.bytes_per_image(),
                "config": self.config.feature_dict(),
                "weights_source": self.weights_source(), "levels": {k: list(v) for k, v in self.level_shapes.items()},
                "pool_dim": self.pool_dim, "index": _plain(dict(self.h5[names.INDEX].attrs)) or None,
                "thresholds": self.records.thresholds(), "generations": generations.current(self.h5)}

    def bytes_per_image(self) -> dict:
        """Stored bytes of one image: per level, the pooled vector, and their total."""
        per = {lv: self._row_bytes(lv) for lv in self.config.levels}
        per["pool"] = self.pool_dim * 4
        per["total"] = sum(per.values())
        return per

    def is_joined(self) -> bool:
        return any(self.h5[names.LEVELS][lv].is_virtual for lv in self.config.levels)

    # --- writing -------------------------------------------------------------------------

    def append(self, paths, sha256s, feats: dict, encoded: bool | set = False) -> np.ndarray:
        """Write a batch of images and commit it; returns their row ids (int64).

        ``feats`` holds ``pool`` (B, D) and every stored level (B, h, w, C) as features, or,
        with ``encoded`` (True, or a set of levels), as they are stored (pca codes: copies of
        stored rows).
        """
        b = len(paths)
        if self.is_joined():
            raise StoreError(f"{self.path} joins shard files (HDF5 virtual datasets) and cannot grow: "
                             f"index the new images into a new corpus")
        if not (len(sha256s) == b == len(feats["pool"])):
            raise ValueError("paths, sha256s and features must have the same length")
        n = len(self)
        self._check_room(b)
        groups = [self.h5[names.PATHS], self.h5[names.SHA256], self.h5[names.POOL]] + \
                 [self.h5[names.LEVELS][lv] for lv in self.config.levels]
        for ds in groups:
            if ds.shape[0] < n + b:
                ds.resize(n + b, axis=0)
        self.h5[names.PATHS][n:n + b] = list(paths)
        self.h5[names.SHA256][n:n + b] = np.array([s.encode("ascii") for s in sha256s], dtype=SHA_DTYPE)
        digests.write_names(self.h5, n, paths, sha256s)
        self._write_rows(names.POOL, names.POOL_PART, n, feats["pool"])
        for lv, rep in self.representations.items():
            if rep.needs_fit:
                raise StoreError(f"{self.path}: {lv} is stored as {rep.name}, which is not fitted yet "
                                 f"(fit_representations first)")
            stored = lv in encoded if isinstance(encoded, (set, frozenset)) else encoded
            self._write_rows(names.level(lv), lv, n, _as_stored(rep, feats[lv]) if stored else rep.encode(feats[lv]))
        self.h5.flush()
        self.h5.attrs[names.N_COMMITTED] = n + b
        self.h5.flush()
        return np.arange(n, n + b, dtype=np.int64)

    def _write_rows(self, name: str, part: str, start: int, rows: np.ndarray) -> None:
        """Rows ``start:`` of dataset ``name``, as its dtype stores them, and their digests."""
        ds = self.h5[name]
        rows = np.ascontiguousarray(rows, dtype=ds.dtype)
        ds[start:start + len(rows)] = rows
        digests.write(self.h5, part, start, rows)

    @property
    def has_digests(self) -> bool:
        """Whether the file keeps per-image digests (``store/digests.py``; since 0.3.1)."""
        return names.DIGESTS in self.h5

    def _check_digests(self, part: str, ids: np.ndarray, rows: np.ndarray) -> None:
        """Refuse stored ``rows`` (of images ``ids``) whose bytes differ from their digests."""
        bad = digests.check(self.h5, part, ids, rows, read=self._read)
        if bad:
            i = int(ids[bad[0]])
            where = self.paths()[i] if i < len(self) else "?"
            dataset = names.POOL if part == names.POOL_PART else names.level(part)
            raise StoreError(f"{self.path}: {dataset} of image {i} ({where}) does not match its digest "
                             f"({len(bad)} of {len(ids)} rows read): the file is damaged; "
                             f"`spade-faiss verify --deep {self.path}` lists what")

    def _check_room(self, b: int) -> None:
        """Refuse a batch the disk or the process's file-size limit cannot hold, before a byte is
        written: HDF5 cannot undo a half-flushed write (a full disk mid-append used to leave a
        file that no command could open, though its committed rows were intact)."""
        if self.h5.driver == "core":
            return
        need = self.room_needed(b)
        stats = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        free = stats.f_bavail * stats.f_frsize
        if need > free:
            raise StoreError(f"{self.path}: {free // 2**20} MiB free on its disk, a batch of {b} images needs about "
                             f"{need // 2**20} MiB: nothing was written (the committed images are intact); free "
                             f"space and run the same command again")
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        size = os.path.getsize(self.path)
        if limit != resource.RLIM_INFINITY and size + need > limit:
            raise StoreError(f"{self.path}: the process may write files of at most {limit} bytes (ulimit -f), the "
                             f"corpus would grow to about {size + need}: nothing was written (the committed images "
                             f"are intact)")

    def room_needed(self, b: int) -> int:
        """Bytes an append of ``b`` images may add to the file, never less than it adds: each
        level's rows at the size the file stores them so far on average (compressed rows vary:
        25% more), or raw before any row; one new chunk of each dataset whose chunks hold many
        images' rows per chunk boundary the batch crosses; the paths and HDF5's records per
        image; and a margin for HDF5's own metadata."""
        n = len(self)
        need = METADATA_MARGIN_BYTES + b * ROW_OVERHEAD_BYTES
        for lv in self.config.levels:
            ds = self.h5[names.LEVELS][lv]
            raw = int(np.prod(ds.shape[1:])) * ds.dtype.itemsize + 64  # 64: a filter's own bytes
            stored = ds.id.get_storage_size() / n if n and not ds.is_virtual else raw
            need += int(b * min(raw, 1.25 * stored + 64))
        for name in (names.PATHS, names.SHA256, names.POOL,
                     *(names.digest(p) for p in names.digest_parts(self.config.levels))):
            if name in self.h5 and self.h5[name].chunks:
                ds = self.h5[name]
                rows = ds.chunks[0]
                chunk = int(np.prod(ds.chunks)) * ds.dtype.itemsize
                need += (math.ceil((n + b) / rows) - math.ceil(n / rows)) * chunk  # chunks begun
        return need

    @property
    def needs_fit(self) -> bool:
        """Whether a representation still needs fitting on features before rows can be appended."""
        return any(r.needs_fit for r in self.representations.values())

    @property
    def input_dtype(self) -> str:
        """The feature dtype appends need: float16 when every level stores float16 values."""
        names = {r.name.removesuffix("+zstd") for r in self.representations.values()}
        return "float16" if names == {"float16"} else "float32"

    def fit_representations(self, feats: dict, seed: int) -> None:
        """Fit the unfitted (pca) representations on ``feats`` (level -> (n, h, w, C) float32)
        and store their arrays."""
        for lv, rep in self.representations.items():
            if rep.needs_fit:
                rep.fit(feats[lv].reshape(-1, feats[lv].shape[-1]), seed)
        write_representations(self.h5, self.representations)
        self.h5.flush()

    def adopt_representations(self, other: FeatureStore) -> None:
        """Use the fitted representations of ``other`` (shards of one corpus share them)."""
        if other.config.storage != self.config.storage:
            raise StoreError(f"{other.path} stores {other.config.storage}, {self.path} {self.config.storage}")
        for lv, rep in self.representations.items():
            rep.state = other.representations[lv].state
        write_representations(self.h5, self.representations)
        self.h5.flush()

    def nbytes_on_disk(self) -> int:
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0


def _as_stored(rep: Representation, rows: np.ndarray) -> np.ndarray:
    """Copied stored rows in ``rep``'s layout: pca codes of a file without the exponent channel
    gain a zero one (the same decoded values); the reverse is refused (it could clip)."""
    if rep.is_pca and rows.shape[-1] != rep.stored_channels:
        if rep.exponent and rows.shape[-1] == rep.dims:
            return np.concatenate([rows, np.zeros((*rows.shape[:-1], 1), rows.dtype)], axis=-1)
        raise StoreError(f"stored rows of {rows.shape[-1]} channels cannot be copied into a {rep.name} level of "
                         f"{rep.stored_channels} (a corpus written by a newer version: convert it there)")
    return rows
