"""ImageIndex: the stage-1 kNN over pooled image vectors (docs/design.md §6).

``auto`` is an exact ``Flat`` index up to ``FLAT_MAX_IMAGES`` and ``IVF{nlist},{encoding}``
above, unless IVF would not be faster. The default ``nprobe`` of an IVF index is chosen by
measurement at build time: twice the smallest reaching ``target_recall`` (recall@k against
exact search, leave-one-out over a seeded sample of the corpus), stored with the index.

Distances are re-computed exactly (float64, rounded to float32) for the candidates faiss
returns, and results are ordered by (squared distance, id): ties go to the lower image id
(docs/design.md §1), and an image's distances do not depend on which other queries share its batch.
Row ids of the store are faiss ids.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time

import faiss
import numpy as np

from .config import DEFAULTS, INDEX_KINDS, check_choice, check_encoding

log = logging.getLogger(__name__)

FLAT_MAX_IMAGES = 50_000
# Serialized indexes larger than this go to a memory-mapped sidecar .faiss file.
SIDECAR_MIN_BYTES = 512 * 2**20
TRAIN_POINTS_PER_LIST = 256
# Extra candidates re-ranked exactly, so that faiss's rounding cannot change the k kept.
RERANK_MARGIN = 8
RERANK_BYTES = 16 << 20  # float64 differences re-ranked at once
TUNING_QUERIES = 200
TUNING_K = 50
NPROBE_MARGIN = 2
# An IVF grown by appends keeps its trained lists; its default nprobe is tuned again once the
# corpus has grown by this factor since the last tuning (more vectors per list, the same
# nprobe scans a larger share), and `reindex` is suggested once ivf_nlist would double.
RETUNE_GROWTH = 1.5


def ivf_nlist(n: int) -> int:
    """``4*sqrt(n)`` lists, at most ``n/39`` so that every list gets 39 training points."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))


class ImageIndex:
    """A faiss index over pooled vectors (ids = store rows).

    Parameters
    ----------
    index : faiss.Index
    nprobe : int or None
        Default IVF probes at search time (None for Flat).
    encoding : str
        IVF list encoding (``Flat``, ``SQ8``, ``PQ{m}``).
    tuning : dict
        How the default nprobe was chosen (target and measured recall, k, queries).
    """

    def __init__(self, index: faiss.Index, nprobe: int | None = None, encoding: str = DEFAULTS["encoding"],
                 tuning: dict | None = None):
        self.index = index
        self.ivf = faiss.try_extract_index_ivf(index)
        if self.ivf is not None:
            self.ivf.make_direct_map()  # reconstruct() for the exact re-ranking
        self.nprobe = nprobe
        self.encoding = encoding
        self.tuning = tuning or {}
        self.excluded = np.empty(0, np.int64)
        self._selector = None

    # --- building ------------------------------------------------------------------------

    @classmethod
    def build(cls, vectors: np.ndarray, kind: str = "auto", nlist: int | None = None, nprobe: int | None = None,
              encoding: str = DEFAULTS["encoding"], seed: int = DEFAULTS["seed"],
              target_recall: float = DEFAULTS["target_recall"], k: int = TUNING_K,
              max_train_points: int | None = None) -> ImageIndex:
        """Index ``vectors`` (float32 (N, D)), ids ``0..N-1``.

        ``kind``: ``auto``/``flat``/``ivf``. IVF is trained on at most ``256*nlist`` vectors (or
        ``max_train_points``) drawn with ``seed``; without ``nprobe`` its default is tuned to
        ``target_recall`` at ``k`` (with a factor ``NPROBE_MARGIN``). ``auto`` keeps Flat when
        the tuned IVF is not faster.
        """
        vectors = _as_f32(vectors)
        check_choice("kind", kind, INDEX_KINDS)
        check_encoding("encoding", encoding)
        n, d = vectors.shape
        if kind == "flat" or (kind == "auto" and n <= FLAT_MAX_IMAGES):
            return cls._flat(vectors)
        nlist = nlist or ivf_nlist(n)
        if n < nlist:
            raise ValueError(f"IVF with nlist={nlist} needs at least {nlist} vectors, got {n}")
        index = faiss.index_factory(d, f"IVF{nlist},{encoding}", faiss.METRIC_L2)
        rng = np.random.default_rng(seed)
        n_train = min(TRAIN_POINTS_PER_LIST * nlist, max_train_points or n)
        sample = vectors if n <= n_train else vectors[np.sort(rng.choice(n, n_train, replace=False))]
        faiss.extract_index_ivf(index).cp.seed = seed
        index.train(sample)
        index.add(vectors)
        ivf = cls(index, nprobe, encoding)
        if nprobe is None:
            ivf._tune_default(vectors, seed, target_recall, k)
            if kind == "auto" and ivf.tuning["ivf_ms"] >= ivf.tuning["flat_ms"]:
                log.info("IVF (%.2f ms/query) is not faster than Flat (%.2f ms): keeping Flat",
                         ivf.tuning["ivf_ms"], ivf.tuning["flat_ms"])
                return cls._flat(vectors)
        return ivf

    @classmethod
    def _flat(cls, vectors: np.ndarray) -> ImageIndex:
        index = faiss.IndexFlatL2(vectors.shape[1])
        index.add(vectors)
        return cls(index)

    def tune(self, vectors: np.ndarray, rows: np.ndarray, target_recall: float, k: int, margin: int = 1) -> dict:
        """The smallest nprobe whose recall@k against exact search over ``vectors`` (the
        indexed ones) reaches ``target_recall``, leave-one-out over the corpus vectors ``rows``
        (each query's own row is left out of both answers, so they act as held-out images);
        returns the measurements: ``nprobe`` (that smallest one), ``timed_nprobe`` (``margin``
        times it, at most nlist: the one to use) and the time per query of the IVF search at
        ``timed_nprobe`` and of the exact search, so that ``auto`` compares what it would run."""
        q = vectors[rows]
        truth = _drop_self(faiss.knn(q, vectors, k + 1)[1], rows, k)
        t = time.perf_counter()  # timed warm, as the IVF search below (a first call runs slower)
        faiss.knn(q, vectors, k + 1)
        flat_ms = 1e3 * (time.perf_counter() - t) / len(rows)

        measured = {}

        def recall(p: int) -> float:
            if p not in measured:
                found = self.index.search(q, k + 1, params=faiss.SearchParametersIVF(nprobe=p))[1]
                measured[p] = float(np.mean([len(set(a) & set(b)) / k
                                             for a, b in zip(_drop_self(found, rows, k), truth)]))
            return measured[p]
        nlist = self.ivf.nlist
        lo, hi = 0, 1  # recall(lo) < target (lo=0: none measured) <= recall(hi)
        while hi < nlist and recall(hi) < target_recall:
            lo, hi = hi, min(nlist, 2 * hi)
        while hi - lo > 1:  # recall grows with nprobe: bisect between the powers of two
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if recall(mid) < target_recall else (lo, mid)
        recall(hi)
        used = min(nlist, margin * hi)
        t = time.perf_counter()
        self.index.search(q, k, params=faiss.SearchParametersIVF(nprobe=used))
        ivf_ms = 1e3 * (time.perf_counter() - t) / len(rows)
        return {"nprobe": int(hi), "timed_nprobe": int(used), "target_recall": float(target_recall),
                "recall": measured[hi], "k": int(k), "queries": int(len(rows)), "ivf_ms": round(ivf_ms, 4),
                "flat_ms": round(flat_ms, 4)}

    @property
    def retune_due(self) -> bool:
        """Whether the index has grown by ``RETUNE_GROWTH`` since its nprobe was tuned; False
        for Flat, for an nprobe the user chose (never tuned) and for a corpus tuned before the
        size was recorded."""
        at = int(self.tuning.get("images", 0)) if self.ivf is not None else 0
        return bool(at) and self.ntotal >= RETUNE_GROWTH * at

    def retune(self, vectors: np.ndarray, seed: int, target_recall: float, k: int) -> None:
        """Tune the default nprobe again over ``vectors`` (every indexed one)."""
        n = self.ntotal
        self._tune_default(_as_f32(vectors), seed, target_recall, k)
        if ivf_nlist(n) >= 2 * self.ivf.nlist:
            log.warning("the IVF image index has %d lists for %d images (%d would suit it): `spade-faiss reindex` "
                        "retrains it", self.ivf.nlist, n, ivf_nlist(n))

    def _tune_default(self, vectors: np.ndarray, seed: int, target_recall: float, k: int) -> None:
        """Set the default nprobe by :meth:`tune` over seeded leave-one-out queries of ``vectors``
        (every indexed one), recording the size it was tuned at (``retune_due``)."""
        n = len(vectors)
        rows = np.sort(np.random.default_rng(seed + 1).choice(n, min(TUNING_QUERIES, n), replace=False))
        # Leave-one-out queries sit in the index and overestimate the recall of new images
        # (measured at 1M vectors: 0.998 against 0.976 at the same nprobe): take twice it.
        self.tuning = {**self.tune(vectors, rows, target_recall, min(k, n - 1), margin=NPROBE_MARGIN), "images": n}
        self.nprobe = self.tuning["timed_nprobe"]

    def add(self, vectors: np.ndarray) -> None:
        """Append vectors; their ids continue from ``ntotal`` (no retraining)."""
        self.index.add(_as_f32(vectors))
        if self.ivf is not None:
            self.ivf.make_direct_map()

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def searchable(self) -> int:
        """Images a search can return: all but the excluded ones."""
        return self.ntotal - len(self.excluded)

    def exclude(self, ids: np.ndarray) -> None:
        """Never return the images ``ids`` (removed while the corpus is read, ``store/appends.py``):
        faiss skips them during the search itself, so a query still gets its ``k`` nearest among
        the others, exactly. Replaces the previous exclusions."""
        self.excluded = np.unique(np.asarray(ids, dtype=np.int64))
        batch = faiss.IDSelectorBatch(self.excluded) if len(self.excluded) else None
        self._selector = (faiss.IDSelectorNot(batch), batch) if batch is not None else None  # batch kept alive

    def _selection(self, within: np.ndarray | None):
        """The faiss selector of a search (None: every image) and how many images it lets
        through: the searchable images, or those of ``within`` among them."""
        if within is None:
            return (self._selector[0] if self._selector else None), self.searchable
        allowed = np.setdiff1d(np.asarray(within, dtype=np.int64), self.excluded)
        return faiss.IDSelectorBatch(allowed), len(allowed)

    def _params(self, selector, probes: int | None = None):
        sel = {"sel": selector} if selector is not None else {}
        if self.ivf is None:
            return faiss.SearchParameters(**sel) if sel else None
        return faiss.SearchParametersIVF(nprobe=probes, **sel)

    @property
    def factory(self) -> str:
        """The faiss factory string, e.g. ``Flat``, ``IVF1024,Flat`` or ``IVF1024,SQ8``."""
        if self.ivf is None:
            return "Flat"
        return f"IVF{self.ivf.nlist},{self.encoding}"

    # --- searching -----------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None, within: np.ndarray | None = None):
        """The ``k`` nearest stored images of each query (``within``: among those ids only, e.g.
        the tiles of one position; faiss skips the others during the search itself).

        Returns
        -------
        distances : float32 (Q, k), squared L2 computed exactly (float64, then rounded), ascending
        ids : int64 (Q, k), ties ordered by lower id
        """
        queries = _as_f32(queries)
        selector, searchable = self._selection(within)
        if not 1 <= k <= searchable:
            where = " of those searched" if within is not None else ""
            raise ValueError(f"k={k}: expected 1 <= k <= {searchable} (images in the index{where}"
                             f"{f', {len(self.excluded)} removed' if len(self.excluded) else ''})")
        wide = min(searchable, k + RERANK_MARGIN)
        if self.ivf is None:
            _, ids = self.index.search(queries, wide, params=self._params(selector))
        else:
            probes = int(nprobe or self.nprobe or 1)
            _, ids = self.index.search(queries, wide, params=self._params(selector, probes))
            while (ids < 0).any() and probes < self.ivf.nlist:
                # Too few vectors in the probed lists: probe more for those rows.
                short = np.flatnonzero((ids < 0).any(axis=1))
                probes = min(self.ivf.nlist, 2 * probes)
                ids[short] = self.index.search(queries[short], wide, params=self._params(selector, probes))[1]
        return self._rerank(queries, ids, k)

    def _rerank(self, queries: np.ndarray, ids: np.ndarray, k: int):
        """Exact float64 distances of the candidates, in chunks of queries whose float64
        differences stay under ``RERANK_BYTES`` (each row's sum is the same whatever the chunk:
        256 queries at once, as calibration's corpus sample asks, took 0.6 GB)."""
        dist = np.empty(ids.shape, np.float32)
        rows = max(1, RERANK_BYTES // max(1, ids.shape[1] * queries.shape[1] * 8))
        for r0 in range(0, len(ids), rows):
            part = ids[r0:r0 + rows]
            vectors = self.index.reconstruct_batch(part.ravel()).reshape(*part.shape, -1)
            diff = vectors.astype(np.float64) - queries[r0:r0 + rows, None, :].astype(np.float64)
            dist[r0:r0 + rows] = np.einsum("qkd,qkd->qk", diff, diff)
        order = np.lexsort((ids, dist), axis=1)[:, :k]
        return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)

    def mismatched_rows(self, vectors: np.ndarray, rows: np.ndarray) -> list[int]:
        """Of ``rows``, those whose vector in the index is not ``vectors`` (their pooled vectors
        in the store): equal for Flat lists, within the encoding's error for SQ8/PQ."""
        got = np.stack([self.index.reconstruct(int(r)) for r in rows]) if len(rows) else vectors[:0]
        if self.encoding == "Flat":
            bad = ~(got == vectors).all(axis=1)
        else:
            err = np.linalg.norm(got - vectors, axis=1)
            bad = err > 0.5 * np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
        return [int(r) for r in np.asarray(rows)[bad]]

    # --- persistence ---------------------------------------------------------------------

    def attrs(self) -> dict:
        a = {"factory": self.factory, "ntotal": self.ntotal, "faiss_version": faiss.__version__}
        if self.ivf is not None:
            a.update(nlist=int(self.ivf.nlist), nprobe=int(self.nprobe or 1), encoding=self.encoding)
            a.update({f"tuning_{key}": value for key, value in self.tuning.items() if key != "nprobe"})
        return a

    def save(self, store) -> None:
        """Write into ``store`` (a FeatureStore), or into a sidecar ``.faiss`` when large."""
        blob = faiss.serialize_index(self.index)
        attrs = self.attrs()
        if blob.nbytes < SIDECAR_MIN_BYTES:
            store.records.write_index(blob, attrs)
            return
        path = store.records.sidecar_path()
        name = os.path.basename(path)
        tmp = path + ".tmp"
        blob.tofile(tmp)
        os.replace(tmp, path)  # atomic: a crash leaves the old sidecar or the new one
        attrs.update(sidecar=name, sidecar_sha256=hashlib.sha256(blob).hexdigest(), sidecar_bytes=int(blob.nbytes))
        store.records.write_index(None, attrs)

    @staticmethod
    def sidecar_problems(store) -> list[str]:
        """Whether a sidecar ``.faiss`` file still has the sha256 the corpus recorded (read whole)."""
        _, attrs = store.records.read_index()
        if "sidecar" not in attrs:
            return []
        side = _sidecar(store, attrs)
        h = hashlib.sha256()
        with open(side, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        if h.hexdigest() != attrs.get("sidecar_sha256"):
            return [f"{side}: sha256 differs from the one recorded in {store.path}"]
        return []

    @classmethod
    def load(cls, store) -> ImageIndex | None:
        """The index stored in ``store``, or None when none was written yet."""
        blob, attrs = store.records.read_index()
        if blob is None and "sidecar" not in attrs:
            return None
        try:
            if blob is not None:
                index = faiss.deserialize_index(blob)
            else:
                index = _read_sidecar(_sidecar(store, attrs), attrs)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{store.path}: the image index cannot be read ({str(e).splitlines()[0]}); "
                             f"rebuild it with `spade-faiss reindex {store.path}`") from None
        nprobe = attrs.get("nprobe")
        tuning = {k[len("tuning_"):]: v for k, v in attrs.items() if k.startswith("tuning_")}
        return cls(index, None if nprobe is None else int(nprobe), str(attrs.get("encoding", "Flat")), tuning)


def _drop_self(ids: np.ndarray, rows: np.ndarray, k: int) -> list[np.ndarray]:
    return [row_ids[row_ids != self_id][:k] for row_ids, self_id in zip(ids, rows)]


def _sidecar(store, attrs: dict) -> str:
    """The sidecar file the corpus recorded (by its name, in the corpus's folder)."""
    return os.path.join(os.path.dirname(store.records.sidecar_path()), attrs["sidecar"])


def _read_sidecar(path: str, attrs: dict) -> faiss.Index:
    if not os.path.isfile(path):
        raise OSError(f"sidecar {path} is missing")
    if os.path.getsize(path) != attrs.get("sidecar_bytes"):
        raise OSError(f"sidecar {path} has {os.path.getsize(path)} bytes, expected {attrs.get('sidecar_bytes')}")
    try:
        return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:  # index types without mmap support are read whole
        return faiss.read_index(path)


def _as_f32(x) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array of vectors, got shape {x.shape}")
    return x
