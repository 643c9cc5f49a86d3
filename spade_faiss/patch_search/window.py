"""The ``window`` stage-2 engine: a locality-restricted search (an approximation of SPADE, opt-in).

Each query location ``(y, x)`` is compared only with the gallery locations ``(y + dy, x + dx)``,
``|dy|, |dx| <= radius``, of every retrieved image (the same grid: same crop); ``radius = 0``
is a same-position comparison, a radius that covers the grid is the exact search. Within that
contract the result is exact: the same distances as brute force over the window (``exact.py``),
and the nearest with ties to the lowest image, then the lowest position. For roughly aligned
objects the nearest normal patch lies near the same position (the paper's PatchMatch remark);
``benchmarks/bench_locality.py`` measures what a radius costs in accuracy.
"""

from __future__ import annotations

import numpy as np
import torch

from .exact import STEP_BYTES, squared_distances


def search(query: np.ndarray, gallery: list[np.ndarray], kappa: int, radius: int):
    """The ``kappa`` smallest distances of each query location within its window.

    Parameters
    ----------
    query : float32 (B, h, w, C)
    gallery : per-image (h, w, C) arrays (any float dtype: the exact values)
    kappa : int, at most the number of gallery locations in the smallest window
    radius : int >= 0

    Returns
    -------
    distances : float32 (B, h, w), mean of the kappa smallest
    nearest : int64 (B, h, w, 2), (gallery image index, flat position)
    """
    b, h, w, c = query.shape
    if any(g.shape[:2] != (h, w) for g in gallery):
        raise ValueError(f"window search needs gallery grids equal to the query's {(h, w)}")
    window = min(radius + 1, h) * min(radius + 1, w) * len(gallery)  # the smallest window: a corner
    if window < kappa:
        raise ValueError(f"kappa={kappa} needs at least {kappa} gallery vectors in every window, "
                         f"the corners have {window}: use a larger radius")
    gal = [torch.from_numpy(g) for g in gallery]  # each (h, w, C): no stacked copy of the gallery
    step = max(1, STEP_BYTES // (4 * h * w * c))  # gallery images per pass
    dist = np.empty((b, h, w), np.float32)
    nearest = np.empty((b, h, w, 2), np.int64)
    for i in range(b):
        q = torch.from_numpy(np.ascontiguousarray(query[i], dtype=np.float32))
        best_d = torch.full((h, w, kappa), float("inf"))
        best_c = torch.full((h, w, kappa), np.iinfo(np.int64).max, dtype=torch.int64)
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
                if ys.start >= ys.stop or xs.start >= xs.stop:
                    continue
                gy, gx = slice(ys.start + dy, ys.stop + dy), slice(xs.start + dx, xs.stop + dx)
                d = torch.cat([squared_distances(q[ys, xs], torch.stack([g[gy, gx] for g in gal[k0:k0 + step]]).float())
                               for k0 in range(0, len(gallery), step)])  # (K, hh, ww)
                pos = torch.arange(h * w).view(h, w)[gy, gx]
                cols = torch.arange(len(gallery))[:, None, None] * (h * w) + pos  # (K, hh, ww)
                merged_d = torch.cat([best_d[ys, xs], d.permute(1, 2, 0)], dim=2)
                merged_c = torch.cat([best_c[ys, xs], cols.permute(1, 2, 0)], dim=2)
                order = _lexsort_last(merged_c, merged_d)[..., :kappa]
                best_d[ys, xs] = torch.gather(merged_d, 2, order)
                best_c[ys, xs] = torch.gather(merged_c, 2, order)
        dist[i] = best_d.double().mean(dim=2).float().numpy()
        first = best_c[..., 0].numpy()
        nearest[i] = np.stack([first // (h * w), first % (h * w)], axis=-1)
    return dist, nearest


def _lexsort_last(cols: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Indices that sort the last axis by distance, ties by column."""
    by_col = torch.argsort(cols, dim=-1, stable=True)
    by_d = torch.argsort(torch.gather(d, -1, by_col), dim=-1, stable=True)
    return torch.gather(by_col, -1, by_d)
