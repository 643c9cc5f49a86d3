"""The ``dense`` stage-2 engine: every pair's distance through one float32 GEMM per gallery image
(``torch.addmm``), then an exact re-check that makes its answer the ``pruned`` engine's, bit for
bit, whatever the GEMM rounds (so neither its kernel nor its thread count can change a result).
For the small levels where the pruned engine's fixed costs exceed what it saves.

**Candidates.** For a query ``q`` and gallery vector ``g`` the GEMM gives
``y ~ ||g||^2 - 2 q.g`` (float32, any summation order, FMA or not) and ``e = y + ||q||^2``
approximates the squared distance ``d`` within ``E(q) = gamma (||q|| + M)^2`` with
``M = max ||g||`` and ``gamma = (C + 8) u / (1 - (C + 8) u)``, ``u = 2^-24``. Let ``e_k`` be the
kappa-th smallest ``e`` of ``q``: the ``kappa`` vectors giving it have exact distances (``exact.py``,
within ``SUM_EPS`` of ``d``) ``<= (e_k + E)(1 + SUM_EPS)``, which bounds the kappa-th smallest
exact distance ``D_k``; every vector that can be among the kappa nearest has
``e <= D_k / (1 - SUM_EPS) + E``. Those are re-checked with the exact distance and the kappa
smallest kept (``exact.kappa_smallest``): brute force with the exact distance.

The GEMM runs over groups of gallery images (up to ``GROUP_BYTES`` of products); candidates are
collected against the running threshold (it only falls) and filtered by the final one. All of it
runs in torch: numpy's OpenBLAS threads keep spinning after a call and slow the torch work that
follows on a small machine (measured: the pruned engine's layer1 1.3x slower).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .exact import SUM_EPS, gallery_offsets, kappa_smallest, locate, pair_distances, row_reader

GROUP_BYTES = 16 << 20  # float32 products of one group of gallery images
U32 = 2.0**-24


@dataclasses.dataclass
class DenseImage:
    """One gallery image at one level, as the dense engine keeps it in the gallery cache."""

    feats: torch.Tensor  # (n, C) float32
    sq: torch.Tensor  # (n,) float32, ~||g||^2
    norm_max: float  # max ||g||, rounded up

    @property
    def nbytes(self) -> int:
        return self.feats.nbytes + self.sq.nbytes


def prepare_image(feats: np.ndarray) -> DenseImage:
    """``feats`` (h, w, C) -> float32 rows, their squared norms and the largest norm."""
    flat = torch.from_numpy(np.ascontiguousarray(feats.reshape(-1, feats.shape[-1]), dtype=np.float32))
    sq64 = (flat.double() ** 2).sum(1)
    norm_max = float(sq64.max().sqrt()) * (1 + 2.0**-40) if len(flat) else 0.0
    return DenseImage(flat, sq64.float(), norm_max)


def search(query: np.ndarray, gallery: list[DenseImage], kappa: int):
    """Same contract and result as :func:`pruned.search` (without statistics): per query image
    (B, h, w, C) float32, the mean of the kappa smallest exact squared distances (B, h, w) and
    the nearest (gallery index, flat position) (B, h, w, 2). Each query image is searched alone,
    so its result does not depend on the batch."""
    b, h, w, c = query.shape
    offsets = gallery_offsets([g.feats.shape[0] for g in gallery], kappa)
    rows_of = row_reader([g.feats for g in gallery], offsets)
    dist = np.empty((b, h * w), np.float32)
    nearest = np.empty((b, h * w), np.int64)
    for i in range(b):
        q = torch.from_numpy(np.ascontiguousarray(query[i].reshape(h * w, c), dtype=np.float32))
        q_idx, g_idx = _candidates(q, gallery, offsets, kappa)
        d = pair_distances(q, rows_of, q_idx, g_idx)
        dist[i], nearest[i] = kappa_smallest(q_idx.numpy(), g_idx.numpy(), d.numpy(), h * w, kappa)
    located = np.stack(locate(nearest, offsets), axis=-1)
    return dist.reshape(b, h, w), located.reshape(b, h, w, 2)


def _candidates(q: torch.Tensor, gallery: list[DenseImage], offsets: np.ndarray, kappa: int):
    """(query row, gallery column) int64 pairs that can be among the kappa nearest (module doc)."""
    c = q.shape[1]
    gamma = (c + 8) * U32 / (1 - (c + 8) * U32)
    q_sq = (q.double() ** 2).sum(1)
    slack = gamma * (q_sq.sqrt() + max(g.norm_max for g in gallery)) ** 2  # E(q), float64
    q2 = q * -2.0  # exact
    best = torch.full((len(q), kappa), float("inf"), dtype=torch.float64)  # kappa smallest e so far
    found_q, found_g, found_y = [], [], []
    for lo, hi in _groups(gallery, len(q)):
        y = torch.cat([_products(q2, g) for g in gallery[lo:hi]], dim=1)  # (n, cols)
        k = min(kappa, y.shape[1])
        part = torch.topk(y, k, dim=1, largest=False).values if k > 1 else y.amin(dim=1, keepdim=True)
        best = torch.cat([best, part.double() + q_sq[:, None]], dim=1).sort(dim=1).values[:, :kappa]
        rows, cols = torch.nonzero(y <= _limit(best[:, -1], slack, q_sq)[:, None], as_tuple=True)
        found_q.append(rows)
        found_g.append(cols + int(offsets[lo]))
        found_y.append(y[rows, cols])
    q_idx, g_idx, y = (torch.cat(x) for x in (found_q, found_g, found_y))
    keep = y <= _limit(best[:, -1], slack, q_sq)[q_idx]
    return q_idx[keep], g_idx[keep]


def _products(q2: torch.Tensor, g: DenseImage) -> torch.Tensor:
    """``||g||^2 + (-2 q).g`` of every query row and gallery vector, float32 (n, n_g)."""
    return torch.addmm(g.sq, q2, g.feats.T)


def _limit(e_k: torch.Tensor, slack: torch.Tensor, q_sq: torch.Tensor) -> torch.Tensor:
    """The largest ``y = e - ||q||^2`` that a vector among the kappa nearest can have, float32
    rounded up (``inf`` while fewer than kappa vectors have been seen)."""
    d_k = (e_k + slack) * (1 + SUM_EPS)
    limit = d_k / (1 - SUM_EPS) + slack - q_sq
    # float64 evaluation (cancellation against ||q||^2 included), then float32 rounding up
    limit = limit + 4 * U32 * limit.abs() + 2.0**-50 * (q_sq + d_k.abs()) + 2.0**-100
    return torch.nextafter(limit.float(), torch.tensor(float("inf")))


def _groups(gallery: list[DenseImage], n_rows: int):
    """Consecutive gallery images whose products (n_rows x their vectors, float32) fit
    ``GROUP_BYTES`` (one image at least): (first, stop) index pairs."""
    lo, cols = 0, 0
    for i, g in enumerate(gallery):
        if i > lo and (cols + g.feats.shape[0]) * n_rows * 4 > GROUP_BYTES:
            yield lo, i
            lo, cols = i, 0
        cols += g.feats.shape[0]
    yield lo, len(gallery)
