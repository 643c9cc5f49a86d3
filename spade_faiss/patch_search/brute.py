"""The ``faiss`` stage-2 engine: exact brute force, ``faiss.knn`` on CPU and ``faiss.knn_gpu``
on GPU (one ``StandardGpuResources`` per thread, reused).

Galleries arrive as per-image arrays; they are searched in chunks of at most ``chunk_bytes``
so memory stays bounded for any ``k_gallery``, and per-chunk results are merged exactly (the
``kappa`` smallest of a union are among the ``kappa`` smallest of each part). An out-of-memory
error (GPU or RAM) splits the chunk and merges exactly.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence

import faiss
import numpy as np

from ..config import DEFAULTS

log = logging.getLogger(__name__)

# faiss's BLAS kNN multiplies 4096-query x 1024-vector blocks by default; 4096-vector blocks
# run ~20% faster here (benchmarks/README.md) for a 64 MiB block of inner products.
BLAS_DATABASE_BLOCK = 4096


# --- devices -----------------------------------------------------------------------------

def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees a GPU (faiss-gpu)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_search_device(device: str = DEFAULTS["device"]) -> str:
    """``auto`` -> ``cuda`` when faiss-gpu sees a GPU, else ``cpu``; ``cuda[:N]`` is checked."""
    if device == "auto":
        return "cuda" if gpu_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not gpu_available():
            raise ValueError(f"device={device!r}: faiss has no GPU here (install faiss-gpu "
                             f"instead of faiss-cpu, never both)")
        return device
    raise ValueError(f"device={device!r}: expected 'auto', 'cpu' or 'cuda[:N]'")


_thread_local = threading.local()


def gpu_resources():
    """One ``StandardGpuResources`` per thread, created once and reused (docs/design.md §4)."""
    res = getattr(_thread_local, "gpu_res", None)
    if res is None:
        res = _thread_local.gpu_res = faiss.StandardGpuResources()
    return res


def _gpu_id(device: str) -> int:
    return int(device.split(":")[1]) if ":" in device else 0


_blas_lock = threading.Lock()


@contextlib.contextmanager
def _blas_blocks():
    """faiss keeps its BLAS block sizes in process globals: set ours for the duration of a
    search and restore them after, so importing this library changes nothing."""
    with _blas_lock:
        old = faiss.cvar.distance_compute_blas_database_bs
        faiss.cvar.distance_compute_blas_database_bs = BLAS_DATABASE_BLOCK
        try:
            yield
        finally:
            faiss.cvar.distance_compute_blas_database_bs = old


def _is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or any(w in text for w in ("out of memory", "cudamalloc", "bad_alloc",
                                                                  "cannot allocate"))


def _knn_splitting(queries: np.ndarray, gallery: np.ndarray, k: int, device: str) -> np.ndarray:
    """``_knn``, halving the gallery chunk (and merging exactly) whenever memory runs out."""
    try:
        return _knn(queries, gallery, k, device)
    except (MemoryError, RuntimeError) as e:
        if not _is_out_of_memory(e) or gallery.shape[0] < 2:
            raise
        half = gallery.shape[0] // 2
        log.warning("out of memory searching %d gallery vectors on %s: splitting in two", gallery.shape[0], device)
        a = _knn_splitting(queries, gallery[:half], min(k, half), device)
        b = _knn_splitting(queries, gallery[half:], min(k, gallery.shape[0] - half), device)
        return np.sort(np.concatenate([a, b], axis=1), axis=1)[:, :k]


def _knn(queries: np.ndarray, gallery: np.ndarray, k: int, device: str) -> np.ndarray:
    """Squared L2 distances to the ``k`` nearest gallery rows, ascending, (nq, k) float32."""
    if device == "cpu":
        with _blas_blocks():
            dist, _ = faiss.knn(queries, gallery, k, metric=faiss.METRIC_L2)
    else:  # faiss's GPU brute force wants queries and vectors of one type (f32 or f16)
        dist, _ = faiss.knn_gpu(gpu_resources(), queries.astype(gallery.dtype, copy=False), gallery, k,
                                device=_gpu_id(device))
    return np.maximum(dist, 0.0, out=dist)


# --- chunked exact search ----------------------------------------------------------------

def iter_chunks(galleries: Iterable[np.ndarray], chunk_bytes: int = DEFAULTS["chunk_bytes"],
                dtype=np.float32) -> Iterator[np.ndarray]:
    """Concatenate per-image galleries (each (n_i, C)) into chunks of at most ``chunk_bytes``
    (an image larger than the budget forms a chunk by itself)."""
    parts, size = [], 0
    for g in galleries:
        g = g.reshape(-1, g.shape[-1])
        nbytes = g.shape[0] * g.shape[1] * np.dtype(dtype).itemsize
        if parts and size + nbytes > chunk_bytes:
            yield _join(parts, dtype)
            parts, size = [], 0
        parts.append(g)
        size += nbytes
    if parts:
        yield _join(parts, dtype)


def _join(parts, dtype) -> np.ndarray:
    if len(parts) == 1:
        return np.ascontiguousarray(parts[0], dtype=dtype)
    out = np.empty((sum(p.shape[0] for p in parts), parts[0].shape[1]), dtype=dtype)
    np.concatenate(parts, axis=0, out=out, casting="same_kind")
    return out


def knn_mean(queries: np.ndarray, chunks: Iterable[np.ndarray], kappa: int = DEFAULTS["kappa"],
             search_device: str = "cpu") -> np.ndarray:
    """Mean of the ``kappa`` smallest squared L2 distances of each query to the union of
    ``chunks``.

    Parameters
    ----------
    queries : float32 (nq, C)
    chunks : iterable of (n_i, C) arrays (float32; float16 too on GPU)
    kappa : int

    Returns
    -------
    float32 (nq,)
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best = None  # (nq, <=kappa) smallest distances so far
    total = 0
    for chunk in chunks:
        total += chunk.shape[0]
        dist = _knn_splitting(queries, chunk, min(kappa, chunk.shape[0]), search_device)
        if best is None:
            best = dist
        elif kappa == 1:
            np.minimum(best, dist, out=best)
        else:
            both = np.concatenate([best, dist], axis=1)
            keep = min(kappa, both.shape[1])
            best = np.partition(both, keep - 1, axis=1)[:, :keep]
    if best is None or total < kappa:
        raise ValueError(f"kappa={kappa} needs at least {kappa} gallery vectors, got {total}")
    return best.mean(axis=1, dtype=np.float64).astype(np.float32)


def level_maps(query: np.ndarray, galleries: Sequence[np.ndarray], kappa: int = DEFAULTS["kappa"],
               search_device: str = "cpu", chunk_bytes: int = DEFAULTS["chunk_bytes"],
               gpu_float16: bool = DEFAULTS["gpu_float16"]) -> np.ndarray:
    """Distance maps of several query images that share one gallery.

    Parameters
    ----------
    query : (B, h, w, C) feature maps of the queries at one level
    galleries : per-image (h, w, C) maps of the retrieved images at the same level
    gpu_float16 : bool
        On GPU, search in float16 (queries and gallery): half the memory traffic, ~1e-3
        relative error. Ignored on CPU, which is always float32.

    Returns
    -------
    float32 (B, h, w): mean of the ``kappa`` smallest squared distances per location
    """
    b, h, w, c = query.shape
    dtype = np.float16 if gpu_float16 and search_device != "cpu" else np.float32
    scores = knn_mean(query.reshape(-1, c), iter_chunks(galleries, chunk_bytes, dtype), kappa, search_device)
    return scores.reshape(b, h, w)
