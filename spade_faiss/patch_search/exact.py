"""Exact squared distances of given (query, gallery) pairs, computed the same way whatever else
is computed alongside: the differences in float32, squared, and summed by a fixed binary tree
over the channels. A pair's distance therefore does not depend on the batch, the chunking or
the engine that asked for it.

Error: each squared difference carries a relative error of at most ``3u`` (u = 2^-24) and the
tree sum of ``C`` non-negative terms at most ``ceil(log2 C) u`` more, so the result is within
``SUM_EPS`` (relative) of the true squared distance for any ``C <= 2^13``.
"""

from __future__ import annotations

import torch

SUM_EPS = 2.0**-19
# Temporaries of one step stay a few MiB: large allocations are fresh pages from the OS
# (page faults dominate the arithmetic on small machines), small ones are reused.
STEP_BYTES = 4 << 20


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis by halving (zero-padded to a power of two): a fixed order."""
    width = x.shape[-1]
    size = 1 << max(0, (width - 1).bit_length())
    if size != width:
        x = torch.nn.functional.pad(x, (0, size - width))
    while size > 1:
        size //= 2
        x = x[..., :size] + x[..., size:]
    return x[..., 0]


def squared_distances(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """``||q - g||^2`` of matching rows (broadcasting over leading axes), float32."""
    diff = queries - gallery
    return tree_sum(diff * diff)


def pair_distances(queries: torch.Tensor, gallery_rows, q_idx: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """Distances of the pairs ``(queries[q_idx[i]], gallery_rows(g_idx[i]))``, in steps of
    about ``STEP_BYTES`` of temporaries. ``gallery_rows(idx)`` returns those gallery vectors as
    a float32 tensor (N, C)."""
    out = torch.empty(len(q_idx), dtype=torch.float32)
    step = max(256, STEP_BYTES // (4 * queries.shape[1]))
    for start in range(0, len(q_idx), step):
        stop = start + step
        out[start:stop] = squared_distances(queries[q_idx[start:stop]], gallery_rows(g_idx[start:stop]))
    return out
