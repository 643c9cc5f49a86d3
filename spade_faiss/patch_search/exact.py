"""Exact squared distances of given (query, gallery) pairs, computed the same way whatever else
is computed alongside: the differences in float32, squared, and summed by a fixed binary tree
over the channels. A pair's distance therefore does not depend on the batch, the chunking or
the engine that asked for it.

Error: each squared difference carries a relative error of at most ``3u`` (u = 2^-24) and the
tree sum of ``C`` non-negative terms at most ``ceil(log2 C) u`` more, so the result is within
``SUM_EPS`` (relative) of the true squared distance for any ``C <= 2^13``.

The engines that re-check candidates with these distances (``pruned``, ``dense``) read the
gallery rows with :func:`row_reader` and select with :func:`kappa_smallest`, so they return the
same bits.
"""

from __future__ import annotations

import numpy as np
import torch

SUM_EPS = 2.0**-19
# Temporaries of one step stay a few MiB: large allocations are fresh pages from the OS
# (page faults dominate the arithmetic on small machines), small ones are reused.
STEP_BYTES = 4 << 20


def tree_sum_(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis by halving (as if zero-padded to a power of two): a fixed order.
    Works in place: ``x`` is overwritten (no fresh buffer per halving; adding the padding's
    zeros would leave a value as it is, so only the lanes present are added)."""
    width = x.shape[-1]
    size = 1 << max(0, (width - 1).bit_length())
    if size != width:
        half = size // 2
        x[..., :width - half].add_(x[..., half:width])
        size = half
    while size > 1:
        size //= 2
        x[..., :size].add_(x[..., size:2 * size])
    return x[..., 0]


def squared_distances(queries: torch.Tensor, gallery: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """``||q - g||^2`` of matching rows (broadcasting over leading axes), float32.
    ``overwrite``: ``queries`` is a temporary of the differences' shape, reused for them."""
    diff = queries.sub_(gallery) if overwrite else queries - gallery
    return tree_sum_(diff.mul_(diff))


def pair_distances(queries: torch.Tensor, gallery_rows, q_idx: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """Distances of the pairs ``(queries[q_idx[i]], gallery_rows(g_idx[i]))``, in steps of
    about ``STEP_BYTES`` of temporaries. ``gallery_rows(idx)`` returns those gallery vectors as
    a float32 tensor (N, C); a :class:`GalleryRows` given columns in ascending order (as the
    engines ask for them) is gathered image by image into each step's buffer, a step spanning
    as many images as its pairs reach (the bits do not depend on the steps: each pair's distance
    is computed alone)."""
    out = torch.empty(len(q_idx), dtype=torch.float32)
    step = max(256, STEP_BYTES // (4 * queries.shape[1]))
    if isinstance(gallery_rows, GalleryRows) and gallery_rows.dtype is not None and gallery_rows.ascending(g_idx):
        buffer = torch.empty(min(step, len(g_idx)), queries.shape[1], dtype=gallery_rows.dtype)
        for start, stop, pieces in gallery_rows.steps(g_idx, step):
            for image, lo, hi in pieces:  # one gather per image present in the step
                torch.index_select(gallery_rows.feats[image], 0, g_idx[lo:hi] - int(gallery_rows.offsets[image]),
                                   out=buffer[lo - start:hi - start])
            out[start:stop] = squared_distances(queries.index_select(0, q_idx[start:stop]),
                                                buffer[:stop - start].float(), overwrite=True)
        return out
    for start in range(0, len(q_idx), step):
        stop = start + step
        out[start:stop] = squared_distances(queries.index_select(0, q_idx[start:stop]),
                                            gallery_rows(g_idx[start:stop]), overwrite=True)
    return out


def gallery_offsets(sizes: list[int], kappa: int) -> np.ndarray:
    """The first gallery column of each image, and the total last (int64, len(sizes) + 1); a
    gallery of fewer than ``kappa`` vectors is refused."""
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    if offsets[-1] < kappa:
        raise ValueError(f"kappa={kappa} needs at least {kappa} gallery vectors, got {int(offsets[-1])}")
    return offsets


def locate(columns: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gallery columns -> (image index, flat position in that image)."""
    image = np.searchsorted(offsets, columns, side="right") - 1
    return image, columns - offsets[image]


class GalleryRows:
    """The exact float32 gallery vectors of gallery columns, from per-image (n_i, C) tensors
    (any float dtype) whose first columns are ``offsets[:-1]``: ``rows(columns)`` reads them
    (columns in ascending order, as the engines ask for them, without a sort)."""

    def __init__(self, feats: list[torch.Tensor], offsets: np.ndarray):
        self.feats, self.offsets = feats, offsets
        self._bounds = torch.from_numpy(offsets)

    @property
    def dtype(self) -> torch.dtype | None:
        """The images' one stored type (None where they differ)."""
        kinds = {f.dtype for f in self.feats}
        return kinds.pop() if len(kinds) == 1 else None

    def steps(self, sorted_idx: torch.Tensor, step: int):
        """``(start, stop, pieces)`` over ascending columns in steps of at most ``step`` pairs,
        ``pieces`` the ``(image, lo, hi)`` runs of the step (``sorted_idx[lo:hi]`` in image)."""
        runs = list(self.runs(sorted_idx))
        at = 0
        for start in range(0, len(sorted_idx), step):
            stop = min(len(sorted_idx), start + step)
            pieces = []
            while at < len(runs) and runs[at][1] < stop:
                image, lo, hi = runs[at]
                pieces.append((image, max(lo, start), min(hi, stop)))
                if hi > stop:
                    break
                at += 1
            yield start, stop, pieces

    @staticmethod
    def ascending(idx: torch.Tensor) -> bool:
        return len(idx) < 2 or bool((idx[1:] >= idx[:-1]).all())

    def runs(self, sorted_idx: torch.Tensor):
        """``(image, lo, hi)`` for each image present in ascending columns: ``sorted_idx[lo:hi]``
        are its columns."""
        cuts = torch.searchsorted(sorted_idx, self._bounds).numpy()
        for j in np.flatnonzero(cuts[1:] > cuts[:-1]).tolist():
            yield j, int(cuts[j]), int(cuts[j + 1])

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.ascending(idx):
            order, sorted_idx = None, idx
        else:
            order = torch.argsort(idx)
            sorted_idx = idx[order]
        out = torch.empty(len(idx), self.feats[0].shape[1], dtype=torch.float32)
        for j, lo, hi in self.runs(sorted_idx):
            part = self.feats[j].index_select(0, sorted_idx[lo:hi] - int(self.offsets[j]))
            if order is None:
                out[lo:hi] = part  # converted to float32 in the copy
            else:
                out[order[lo:hi]] = part.float()
        return out


def row_reader(feats: list[torch.Tensor], offsets: np.ndarray) -> GalleryRows:
    """``rows_of(columns)``: see :class:`GalleryRows`."""
    return GalleryRows(feats, offsets)


def kappa_smallest(q_local: np.ndarray, cols: np.ndarray, d: np.ndarray, n_rows: int, kappa: int):
    """Per query row: mean of the kappa smallest distances (float64 mean, float32 result) and
    the nearest column (ties: the lowest column).

    Distances are non-negative float32, whose bit patterns order like their values, so one
    int64 key per pair sorts or reduces by two fields at once: ``(distance, column)`` for the
    nearest (a per-row minimum) and ``(row, distance)`` for the kappa smallest (one sort)."""
    bits = d.view(np.int32).astype(np.int64)
    near = torch.full((n_rows,), np.iinfo(np.int64).max, dtype=torch.int64)
    near.scatter_reduce_(0, torch.from_numpy(q_local), torch.from_numpy((bits << 32) | cols), "amin")
    near = near.numpy()
    if (near == np.iinfo(np.int64).max).any():  # cannot happen: the threshold keeps the probed ones
        raise RuntimeError("the search kept no candidate for a query; this is a bug")
    nearest = near & 0xFFFFFFFF
    if kappa == 1:
        return (near >> 32).astype(np.int32).view(np.float32), nearest
    key = np.sort((q_local << 32) | bits)
    starts = np.searchsorted(key >> 32, np.arange(n_rows))
    counts = np.diff(np.append(starts, len(key)))
    if (counts < kappa).any():  # cannot happen: the threshold keeps every vector within U
        raise RuntimeError("the search kept fewer than kappa candidates; this is a bug")
    take = (key[starts[:, None] + np.arange(kappa)] & 0xFFFFFFFF).astype(np.int32).view(np.float32)
    return take.astype(np.float64).mean(axis=1).astype(np.float32), nearest
