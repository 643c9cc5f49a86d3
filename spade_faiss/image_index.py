"""ImageIndex: the stage-1 kNN over pooled image vectors (SPEC 3).

``auto`` is an exact ``Flat`` index up to ``FLAT_MAX_IMAGES`` and ``IVF{nlist},Flat`` above.
Row ids of the store are faiss ids. Results are ordered by (squared distance, id): ties go to
the lower image id (SPEC 1.1).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os

import faiss
import numpy as np

log = logging.getLogger(__name__)

FLAT_MAX_IMAGES = 50_000
# Serialized indexes larger than this go to a memory-mapped sidecar .faiss file.
SIDECAR_MIN_BYTES = 512 * 2**20
KINDS = ("auto", "flat", "ivf")
TRAIN_POINTS_PER_LIST = 256


def ivf_nlist(n: int) -> int:
    """``4*sqrt(n)`` lists, at most ``n/39`` so that every list gets 39 training points."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))


def default_nprobe(nlist: int) -> int:
    return int(min(nlist, max(8, nlist // 8)))


class ImageIndex:
    """A faiss index over pooled vectors (ids = store rows).

    Parameters
    ----------
    index : faiss.Index
    nprobe : int or None
        Default IVF probes at search time (None for Flat).
    """

    def __init__(self, index: faiss.Index, nprobe: int | None = None):
        self.index = index
        self.ivf = faiss.try_extract_index_ivf(index)
        self.nprobe = nprobe

    # --- building ------------------------------------------------------------------------

    @classmethod
    def build(cls, vectors: np.ndarray, kind: str = "auto", nlist: int | None = None,
              nprobe: int | None = None, encoding: str = "Flat", seed: int = 0,
              max_train_points: int | None = None) -> ImageIndex:
        """Index ``vectors`` (float32 (N, D)), ids ``0..N-1``.

        ``kind``: ``auto``/``flat``/``ivf``; ``encoding`` of IVF lists: ``Flat``, ``SQ8`` or
        ``PQ{m}``; IVF is trained on at most ``256*nlist`` vectors (or ``max_train_points``)
        drawn with ``seed``.
        """
        vectors = _as_f32(vectors)
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: expected one of {list(KINDS)}")
        n, d = vectors.shape
        if kind == "auto":
            kind = "flat" if n <= FLAT_MAX_IMAGES else "ivf"
        if kind == "flat":
            index = faiss.IndexFlatL2(d)
            index.add(vectors)
            return cls(index)
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
        return cls(index, nprobe or default_nprobe(nlist))

    def add(self, vectors: np.ndarray) -> None:
        """Append vectors; their ids continue from ``ntotal`` (no retraining)."""
        self.index.add(_as_f32(vectors))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def factory(self) -> str:
        if self.ivf is None:
            return "Flat"
        return f"IVF{self.ivf.nlist}"

    # --- searching -----------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None):
        """The ``k`` nearest stored images of each query.

        Returns
        -------
        distances : float32 (Q, k), squared L2, ascending
        ids : int64 (Q, k), ties ordered by lower id
        """
        queries = _as_f32(queries)
        if not 1 <= k <= self.ntotal:
            raise ValueError(f"k={k}: expected 1 <= k <= {self.ntotal} (images in the index)")
        if self.ivf is None:
            dist, ids = self.index.search(queries, k)
        else:
            probes = int(nprobe or self.nprobe or 1)
            dist, ids = self.index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=probes))
            short = np.flatnonzero((ids < 0).any(axis=1))
            if short.size:  # too few vectors in the probed lists: probe them all for those rows
                params = faiss.SearchParametersIVF(nprobe=self.ivf.nlist)
                dist[short], ids[short] = self.index.search(queries[short], k, params=params)
        order = np.lexsort((ids, dist), axis=1)
        return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)

    # --- persistence ---------------------------------------------------------------------

    def attrs(self) -> dict:
        a = {"factory": self.factory, "ntotal": self.ntotal, "faiss_version": faiss.__version__}
        if self.ivf is not None:
            a.update(nlist=int(self.ivf.nlist), nprobe=int(self.nprobe or 1))
        return a

    def save(self, store) -> None:
        """Write into ``store`` (a FeatureStore), or into a sidecar ``.faiss`` when large."""
        blob = faiss.serialize_index(self.index)
        attrs = self.attrs()
        if blob.nbytes < SIDECAR_MIN_BYTES:
            store.write_index(blob, attrs)
            return
        name = os.path.splitext(os.path.basename(store.path))[0] + ".faiss"
        path = store.sidecar_path(name)
        tmp = path + ".tmp"
        blob.tofile(tmp)
        os.replace(tmp, path)  # atomic: a crash leaves the old sidecar or the new one
        attrs.update(sidecar=name, sidecar_sha256=hashlib.sha256(blob).hexdigest(),
                     sidecar_bytes=int(blob.nbytes))
        store.write_index(None, attrs)

    @classmethod
    def load(cls, store) -> ImageIndex | None:
        """The index stored in ``store``, or None when none was written yet."""
        blob, attrs = store.read_index()
        if blob is None and "sidecar" not in attrs:
            return None
        try:
            if blob is not None:
                index = faiss.deserialize_index(blob)
            else:
                index = _read_sidecar(store.sidecar_path(attrs["sidecar"]), attrs)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{store.path}: the image index cannot be read ({str(e).splitlines()[0]}); "
                             f"rebuild it with `spade-faiss reindex {store.path}`") from None
        nprobe = attrs.get("nprobe")
        return cls(index, None if nprobe is None else int(nprobe))


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
