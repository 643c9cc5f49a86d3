"""The ``pruned`` stage-2 engine: the exact ``kappa`` nearest squared distances of every query
location, with fewer and cheaper products than brute force.

**Bound.** Let ``V`` hold the top ``d`` principal directions of the corpus features (orthonormal
columns) and ``mu`` their mean. For a vector ``x`` let ``p(x) = V^T (x - mu)`` and
``r(x) = ||(I - V V^T)(x - mu)||``, and call ``a(x) = [p(x), r(x)]`` its augmented vector
(``d + 1`` values; ``d`` from 73 to 249 by level and operand type, see ``patch_search.WIDTHS``). For any query
``q`` and gallery vector ``g``::

    ||q - g||^2 = ||p(q) - p(g)||^2 + ||(I - V V^T)(q - g)||^2 >= ||a(q) - a(g)||^2     (1)

(the second term is at least ``(r(q) - r(g))^2`` by the triangle inequality). So the distance
in ``d + 1`` dimensions bounds the distance in ``C`` (256 to 1792) from below, and only pairs
whose bound can still win need the full product.

**Rounding, rigorously.** The augmented vectors are computed in float64 (error below
``PROJ_EPS * ||x - mu||``) and rounded to the operand type (bfloat16 where the CPU multiplies
it natively, else float32; a gallery vector then to float16, whose values are float32 values:
``bounds.GalleryOperands``) as ``a~(x)`` (``bounds.py``), and
``rho(x) = ||a~(x) - a(x)|| + PROJ_EPS * ||x - mu||`` is computed per vector. By the triangle
inequality in ``R^(d+1)``::

    sqrt(||q - g||^2) >= ||a~(q) - a~(g)|| - rho(q) - rho(g)                            (2)

With bfloat16 operands the first ``s`` (16) columns of ``a~`` are two bfloat16 parts each,
``a~ = hi + lo`` (``bounds.split_columns``: they hold most of ``||a||^2``, and one part per value
made ``rho`` the threshold's largest term); ``lo`` is 0 elsewhere and with float32 operands.
One GEMM gives ``y`` ~ ``||a~(q)||^2 + ||a~(g)||^2 - 2 (hi(q).hi(g) + lo(q).hi(g) + hi(q).lo(g))
= ||a~(q) - a~(g)||^2 + 2 lo(q).lo(g)`` (the squared norms enter as extra columns, each float32
norm split exactly into three bfloat16 parts; products of bfloat16 values are exact in
float32); the product of the low parts left out is at most ``2 L(q) L(g)`` (``L = ||lo||``).
With float32 accumulation of ``m`` terms the accumulated value is within
``gamma * (N(q) + N(g))^2`` of the exact sum (``N = ||hi|| + ||lo|| >= ||a~||``, which bounds the
sum of the terms' magnitudes; ``gamma = m u / (1 - m u) + u``, ``u = 2^-24``; the code takes 1%
more on the first term, which covers the norm parts' signs), and the output rounding adds
a relative ``2^-8`` (bfloat16) or ``2^-24``. The only assumption is that the GEMM accumulates
in float32 or better (oneDNN's bfloat16 kernels do; the tests are adversarial about it).

**Threshold.** Let ``U(q)`` be the ``kappa``-th smallest exact distance of ``q`` to some
``kappa`` gallery vectors (an upper bound of its ``kappa``-th nearest distance). A gallery
vector whose exact distance could be ``<= U(q)`` has, by (2) and the rounding bounds::

    y <= T(q) = (1 + 2^-8) [ (sqrt(U(q) / (1 - SUM_EPS)) + rho(q) + rho_max)^2 + gamma (N(q) + N_max)^2
                             + 2 L(q) L_max ]

where the maxima run over the gallery. Every gallery vector with ``y > T(q)`` is skipped.
``T(q)`` screens super-blocks and blocks; a block that passes it is then held to ``T(q, B)``,
the same expression with the maxima over the block's columns, and a vector of a block left to
its own ``T(q, g)``, with ``rho(g)``, ``N(g)`` and ``L(g)`` (the bound of each pair, of which
the others are maxima: a few vectors of large norm or rounding set the gallery's, and with them
a median ``T`` 7-10% above ``U`` on the user's run, against 1.6-1.8% for the pair's own; 32%
fewer blocks recomputed and 36% fewer re-checks, nineteenth wave). ``T(q)``, ``T(q, B)`` and
``T(q, g)`` are one expression (``_Thresholds``), evaluated in float32 from terms rounded up
from float64 (``_Terms``); its nine
operations on non-negative values and the conversions of ``gamma`` and of the last factor round
to nearest, eleven relative errors of at most ``u = 2^-24`` each, so a computed value is at
least ``(1 - 11u)`` of the exact one, and the factor ``1 + 2^-20 = 1 + 16u`` (``PAIR_SLACK``)
more than makes up for it (a test checks them against float64). Every vector
left is re-checked with the exact distance of ``exact.py``; the ``kappa`` smallest of the
re-checked ones are the answer, equal to brute force with that exact distance.

**Schedule.** The bound GEMM is computed transposed (gallery x queries) in chunks and kept
only as its minimum over each block of 16 consecutive gallery vectors (an elementwise minimum
of contiguous rows). The minimum is taken over the values' bit patterns as integers (int16 for
bfloat16, int32 for float32), several times faster than a floating-point minimum: IEEE values
are sign and magnitude, so among non-negative values the integer order is the float order, and
any negative value is an integer below every non-negative one. The integer minimum of a block is
therefore its float minimum when the block has no negative value, and a negative value when it
has one; either way ``minimum <= T(q)`` (``T > 0``) reads the same as for the float minimum.
Each query's ``U`` is the ``kappa``-th smallest exact distance of the ``kappa`` vectors of
smallest bound in each of ``max(PROBE, kappa)`` blocks (``PROBE`` = 2): the best block of each
of its as many best groups of 16 blocks
(any ``kappa`` gallery vectors give a valid ``U``; these give a tight one); candidate blocks
are those whose minimum passes ``T(q)`` (screened by super-blocks of 4 first, as integers: each
query's threshold becomes the bit pattern of the largest operand value ``<= T(q)``), and within
them the vectors whose recomputed bound passes. Identical gallery images (byte-equal features)
are searched once when ``kappa == 1`` (a duplicate cannot change a minimum; the nearest is
reported in the first of them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from .bounds import (
    GalleryOperands,
    Operands,
    PreparedImage,
    Projection,
    gallery_matrix,
    make_operands,
    operand_dtype,
    prepare_image,
    workspace,
)
from .exact import STEP_BYTES, SUM_EPS, gallery_offsets, kappa_smallest, locate, pair_distances, row_reader

BLOCK = 16  # gallery columns per block: the GEMM output is kept only as minima over blocks
SUPER = 4  # blocks per super-block, screened first
# Groups whose best block gives each query's first exact distances (its U). Eight had been the
# best while each pair was held to the gallery's maxima; with the pair's own threshold, probing
# costs more than the re-checks a tighter U saves: on the user's run (AMX) layer1 7% and layer2
# 28% faster with 2 than with 8 (10% more re-checks at layer1, 1% at layer2), float32 operands
# 3% (nineteenth wave). One: 20% more re-checks than 2 and slower. A query probes at least
# ``kappa`` groups: its kappa nearest vectors are often in as many images (noisy copies of one).
PROBE = 2
GROUP_BLOCKS = 16  # blocks per probed group (256 columns: a twelfth of a 56 x 56 image)
GROUP = 8  # queries of one block per batched product when bounds are recomputed (4-16: the same speed)
# Candidate (query, block) pairs whose bounds are recomputed at once: at most 64 MiB of bounds
# (and a few times that in indices), whatever the image; a test image far from its gallery can
# pass millions of blocks (the user's run: about 1.2 M re-checked pairs per image on average).
CANDIDATE_BLOCKS = 1 << 20


def last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The size of CPU 0's last-level cache (sysfs; None where it cannot be read)."""
    sizes = {}
    try:
        for entry in Path(root).glob("index*"):
            text = (entry / "size").read_text().strip().upper()
            unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes[int((entry / "level").read_text())] = int(text.rstrip("KMG")) * unit
    except (OSError, ValueError):
        return None
    return sizes[max(sizes)] if sizes else None


# A last-level cache at least this large takes the large schedule below.
LARGE_CACHE_BYTES = 64 << 20
# Output bytes per GEMM call (``CHUNK_BYTES``) and most query rows per pass (``ROWS``; the
# block-minimum array is N/16 x ROWS values). The product is read back at once for its block
# minima, so it should stay in the last-level cache: with a 32 MiB one (an EPYC's), 4 MiB per
# call at 784 rows was 27% faster than 16 MiB; with a large one (an Intel Xeon's 480 MiB, as a
# VM reports it), 16 MiB at 1568 rows makes layer1 9% faster than that (nineteenth wave,
# benchmarks/README.md). Any schedule gives the same results.
ROWS, CHUNK_BYTES = (2048, 16 << 20) if (last_level_cache_bytes() or 0) >= LARGE_CACHE_BYTES else (1024, 4 << 20)
PAD_NORM = 2.0**100  # squared norm of padding columns: they never pass a threshold
TINY = 2.0**-100  # absolute slack for flushed subnormals
PAIR_SLACK = 1 + 2.0**-20  # covers the float32 rounding of a pair's threshold (module doc)
__all__ = ["GalleryOperands", "Operands", "PreparedImage", "Projection", "SearchStats", "make_operands",
           "operand_dtype", "prepare_image", "search"]


@dataclasses.dataclass
class SearchStats:
    """Pairs the engine could have multiplied, and those it re-checked exactly."""

    pairs: int = 0
    exact: int = 0

    @property
    def pruned(self) -> float:
        return 1.0 - self.exact / self.pairs if self.pairs else 0.0


def search(query: np.ndarray, gallery: list[PreparedImage], kappa: int, projection: Projection,
           stats: SearchStats | None = None):
    """The ``kappa`` smallest exact squared distances of every query location to the gallery.

    Parameters
    ----------
    query : float32 (B, h, w, C)
    gallery : prepared images (the same projection), in gallery order
    kappa : int

    Returns
    -------
    distances : float32 (B, h, w), mean of the kappa smallest
    nearest : int64 (B, h, w, 2), (gallery image index, flat position) of the nearest vector
        (ties: the lowest image index, then the lowest position)
    """
    b, h, w, c = query.shape
    images, images_of = _unique(gallery) if kappa == 1 else (gallery, np.arange(len(gallery)))
    offsets = gallery_offsets([g.feats.shape[0] for g in images], kappa)
    total = int(offsets[-1])
    q = torch.from_numpy(np.ascontiguousarray(query.reshape(b * h * w, c), dtype=np.float32))
    dtype = images[0].ops.operand
    ops = make_operands(projection, q.numpy(), dtype)
    pad = -total % (BLOCK * SUPER)
    with workspace((total + pad) * ops.rows.shape[1] * ops.rows.element_size()) as buffer:
        cols = gallery_matrix([g.ops for g in images], pad, PAD_NORM, buffer)
        dist, nearest = _search_passes(q, ops, cols, images, offsets, kappa, stats)
    image, position = locate(nearest, offsets)
    located = np.stack([images_of[image], position], axis=-1)
    return dist.reshape(b, h, w), located.reshape(b, h, w, 2)


def _search_passes(q, ops, cols, images, offsets, kappa, stats):
    """The kappa smallest exact distances (float32) and the nearest column (int64) of every
    query row, in passes of rows (:func:`search`)."""
    total = int(offsets[-1])
    dtype = ops.rows.dtype
    rows_of = row_reader([g.feats for g in images], offsets)
    m = cols.shape[1]
    gamma = 1.01 * m * 2.0**-24 / (1 - m * 2.0**-24) + 2.0**-24
    out_eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
    columns = _Terms.of_columns(images)
    blocks = columns.block_maxima(len(cols) // BLOCK)
    dist = np.empty(len(q), np.float32)
    nearest = np.empty(len(q), np.int64)
    rows = _pass_rows(len(q))
    for start in range(0, len(q), rows):
        stop = min(len(q), start + rows)
        a = ops.rows[start:stop]
        block_min, best = _block_minima(a, cols, max(PROBE, kappa))
        upper = _probe(q, a, cols, best, rows_of, start, total, kappa)
        pairs = _Thresholds(_Terms.of_queries(upper, ops, start, stop), columns, blocks, gamma, out_eps)
        q_idx, g_idx = _candidates(a, cols, block_min, pairs.query(), total, pairs)
        by_column = torch.argsort(g_idx)  # each step of re-checks then reads a few images only
        q_idx, g_idx = q_idx[by_column], g_idx[by_column]
        d = pair_distances(q, rows_of, q_idx + start, g_idx)
        if stats is not None:
            stats.pairs += (stop - start) * total
            stats.exact += len(d) + (stop - start) * kappa
        dist[start:stop], nearest[start:stop] = kappa_smallest(q_idx.numpy(), g_idx.numpy(), d.numpy(),
                                                                stop - start, kappa)
    return dist, nearest


@dataclasses.dataclass
class _Terms:
    """The terms of ``T(q, g)`` (module doc), float32 rounded up from float64: per query row
    ``sqrt(U / (1 - SUM_EPS)) + rho(q)``, ``N(q)``, ``L(q)``; per gallery column ``rho(g)``,
    ``N(g)``, ``L(g)`` (or per block, their maxima over its columns)."""

    reach: torch.Tensor
    norm: torch.Tensor
    low: torch.Tensor

    @staticmethod
    def _up(x: np.ndarray) -> torch.Tensor:
        x = np.asarray(x, dtype=np.float64)
        y = x.astype(np.float32)
        return torch.from_numpy(np.where(y < x, np.nextafter(y, np.float32(np.inf)), y))

    @classmethod
    def of_queries(cls, upper: np.ndarray, ops: Operands, start: int, stop: int) -> _Terms:
        return cls(cls._up(np.sqrt(upper / (1 - SUM_EPS)) + ops.rho[start:stop]), cls._up(ops.norm[start:stop]),
                   cls._up(ops.low[start:stop]))

    @classmethod
    def of_columns(cls, images: list[PreparedImage]) -> _Terms:
        return cls(*(cls._up(np.concatenate([getattr(g.ops, name) for g in images]))
                     for name in ("rho", "norm", "low")))

    def block_maxima(self, n_blocks: int) -> _Terms:
        """Per block of ``BLOCK`` columns, the maxima of its columns' terms (padding columns, past
        the gallery, count as 0: they never pass, whatever their threshold)."""
        def maxima(x):
            return torch.cat([x, x.new_zeros(n_blocks * BLOCK - len(x))]).view(n_blocks, BLOCK).amax(dim=1)
        return _Terms(maxima(self.reach), maxima(self.norm), maxima(self.low))


@dataclasses.dataclass
class _Thresholds:
    """``T(q, g)`` of a pass's query rows against gallery columns, against blocks (the
    largest over a block's columns: a block whose minimum bound is above it has no column that
    passes) and against the whole gallery (``T(q)``), float32, never below the exact value
    (module doc)."""

    rows: _Terms
    columns: _Terms
    blocks: _Terms
    gamma: float
    out_eps: float

    def query(self) -> torch.Tensor:
        """``T(q)`` of every query row of the pass: against the gallery's maxima (its blocks')."""
        top = _Terms(*(x.max().reshape(1) for x in (self.blocks.reach, self.blocks.norm, self.blocks.low)))
        q = torch.arange(len(self.rows.reach))
        return self._of(top, q, torch.zeros_like(q))

    def column(self, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self._of(self.columns, q, g)

    def block(self, q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._of(self.blocks, q, b)

    def _of(self, gallery: _Terms, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        reach = self.rows.reach[q] + gallery.reach[g]
        norm = self.rows.norm[q] + gallery.norm[g]
        t = reach.mul_(reach).add_(norm.mul_(norm).mul_(self.gamma)).add_(self.rows.low[q].mul_(gallery.low[g]).mul_(2))
        return t.mul_((1 + self.out_eps) * PAIR_SLACK).add_(TINY)


def _unique(gallery: list[PreparedImage]):
    """Distinct images (byte-equal features searched once) and, per distinct image, the index
    of its first occurrence in the gallery (the lowest image index)."""
    kept, first_of = [], []
    for i, g in enumerate(gallery):
        if not any(k.fingerprint == g.fingerprint and torch.equal(k.feats, g.feats) for k in kept):
            kept.append(g)
            first_of.append(i)
    return kept, np.array(first_of)


def _bits(dtype: torch.dtype) -> torch.dtype:
    """The integer type whose order on non-negative values of ``dtype`` is theirs (module doc)."""
    return torch.int16 if dtype == torch.bfloat16 else torch.int32


def _threshold_bits(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per query, the bit pattern (``_bits(dtype)``) of the largest ``dtype`` value ``<= t``
    (float32, positive): a bound value is ``<= t`` exactly when its bit pattern is ``<=`` this one
    as an integer (the order of the module doc; a negative value's pattern is negative), so the
    screening compares integers, not converted values."""
    if dtype == torch.float32:
        return t.view(torch.int32)
    rounded = t.to(dtype)
    bits = rounded.view(torch.int16).clone()
    bits[rounded.float() > t] -= 1  # rounded up: the next value below (one pattern less, as t > 0)
    return bits


def _nonzero(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of a 2-d mask's true entries, in row-major order (numpy's flat
    search: several times faster than ``torch.nonzero`` on these sparse masks)."""
    row, col = np.divmod(np.flatnonzero(mask.numpy()), mask.shape[1])
    return torch.from_numpy(row), torch.from_numpy(col)


def _pass_rows(n: int) -> int:
    """Query rows per pass: at most ``ROWS``, in passes of equal size (56 x 56: 4 x 784, not
    3 x 1024 + 64); ``ROWS`` when there are no rows."""
    passes = -(-n // ROWS)
    return -(-n // passes) if passes else ROWS


def _chunk_columns(rows: int, dtype: torch.dtype) -> int:
    """Gallery columns per GEMM call: whole probed groups, about ``CHUNK_BYTES`` of output."""
    group = BLOCK * GROUP_BLOCKS
    return max(group, CHUNK_BYTES // (rows * dtype.itemsize) // group * group)


def _block_minima(a: torch.Tensor, cols: torch.Tensor, probe: int = PROBE):
    """Minimum of the bound over each block of ``BLOCK`` consecutive gallery columns, per query
    ((N / BLOCK, R), as integer bit patterns: ``.view(a.dtype)`` reads them as values, see the
    module doc), and per query the block of smallest minimum in each of its ``probe`` best
    groups of ``GROUP_BLOCKS`` blocks ((R, t) int64, ``t = min(probe, groups)``: distinct blocks,
    of different parts of the gallery). The GEMM is computed transposed (gallery x queries) so
    that the block minimum is an elementwise one over contiguous rows, as fast as a copy."""
    n, r = cols.shape[0], a.shape[0]
    bits = _bits(a.dtype)
    n_blocks = n // BLOCK
    out = torch.empty(n_blocks, r, dtype=bits)
    group_min = torch.empty(-(-n_blocks // GROUP_BLOCKS), r, dtype=bits)
    chunk = _chunk_columns(r, a.dtype)
    at = a.T.contiguous()
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        dest = out[c0 // BLOCK:c1 // BLOCK]
        torch.amin(torch.mm(cols[c0:c1], at).view(bits).view((c1 - c0) // BLOCK, BLOCK, r), dim=1, out=dest)
        g0, full = c0 // BLOCK // GROUP_BLOCKS, len(dest) // GROUP_BLOCKS
        torch.amin(dest[:full * GROUP_BLOCKS].view(full, GROUP_BLOCKS, r), dim=1, out=group_min[g0:g0 + full])
        if len(dest) > full * GROUP_BLOCKS:  # the last chunk's partial group
            torch.amin(dest[full * GROUP_BLOCKS:], dim=0, out=group_min[g0 + full])
    # A group's best block lies in that group: search only there.
    best_groups = torch.topk(group_min, min(probe, len(group_min)), dim=0, largest=False).indices.T  # (R, t)
    cand = (best_groups[:, :, None] * GROUP_BLOCKS + torch.arange(GROUP_BLOCKS)).clamp(max=n_blocks - 1)
    vals = out[cand, torch.arange(r)[:, None, None]]  # (R, t, GROUP_BLOCKS)
    return out, torch.gather(cand, 2, torch.min(vals, dim=2).indices[..., None])[..., 0]


def _bounds(a: torch.Tensor, cols: torch.Tensor, q_idx: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The bound of query ``q_idx[i]`` against the ``BLOCK`` columns of block ``blocks[i]``,
    recomputed from the operands by batched products of the same kind as the GEMM (the same
    bounds hold, whatever the order of accumulation): (P, BLOCK) float32.

    A block is gathered once for up to ``GROUP`` of its queries (pairs grouped by block, see
    :func:`_segments`), not once per pair: a candidate block has about 7 queries at layer1, and
    gathering it (4 KiB at width 64) cost more than the product. The products of a step of
    segments are written out before the next step: the temporaries stay a few MiB whatever the
    number of pairs (a segment per pair, as a test image far from its gallery has, had made one
    array of ``GROUP`` times the output: 512 MiB at ``CANDIDATE_BLOCKS``)."""
    out = torch.empty(len(q_idx), BLOCK, dtype=torch.float32)
    order, seg, slot, seg_block, seg_query = _segments(q_idx, blocks)
    width = cols.shape[1]
    flat = cols.view(-1, BLOCK, width)
    step = max(64, STEP_BYTES // ((BLOCK + GROUP) * width * cols.element_size()))  # reused temporaries
    first_pair = torch.searchsorted(seg, torch.arange(0, len(seg_block) + step, step).clamp(max=len(seg_block)))
    for k, s in enumerate(range(0, len(seg_block), step)):
        blocks, queries = _padded(seg_block[s:s + step], step), _padded(seg_query[s:s + step], step)
        g = flat.index_select(0, blocks)
        q = a.index_select(0, queries.reshape(-1)).view(-1, GROUP, width)
        y = torch.bmm(g, q.transpose(1, 2))  # in the operand type, as the GEMM's output
        p0, p1 = int(first_pair[k]), int(first_pair[k + 1])
        out[order[p0:p1]] = y[seg[p0:p1] - s, :, slot[p0:p1]].float()
    return out


def _padded(index: torch.Tensor, step: int) -> torch.Tensor:
    """``index`` (a step's segments) padded with zeros to a power of two from 64 up to ``step``:
    each shape of a bfloat16 ``bmm`` is a oneDNN primitive, kept in its cache (up to 1024, each
    with its own generated code), and unpadded last steps made a new one per call: on the
    user's run 258 in 24 images, the resident set growing ~3 MB per image (eighteenth wave).
    The padding rows are computed and never read."""
    n = len(index)
    size = min(step, max(64, 1 << max(0, n - 1).bit_length()))
    if n >= size:
        return index
    return torch.cat([index, index.new_zeros((size - n, *index.shape[1:]))])


def _segments(q_idx: torch.Tensor, blocks: torch.Tensor):
    """The (query, block) pairs grouped by block into segments of up to ``GROUP`` queries of
    one block: ``order`` sorts the pairs by block (stably), and sorted pair ``i`` is query slot
    ``slot[i]`` of segment ``seg[i]``, whose block is ``seg_block`` and whose ``GROUP`` queries
    are ``seg_query`` (unused slots: query 0, computed and never read)."""
    order = torch.argsort(blocks, stable=True)
    block, query = blocks[order], q_idx[order]
    pos = torch.arange(len(block))
    first = torch.ones(len(block), dtype=torch.bool)
    first[1:] = block[1:] != block[:-1]
    run_start = torch.cummax(torch.where(first, pos, 0), dim=0).values
    slot = (pos - run_start) % GROUP
    seg = torch.cumsum(slot == 0, dim=0) - 1
    seg_block = block[slot == 0]
    seg_query = torch.zeros(len(seg_block), GROUP, dtype=torch.int64)
    seg_query[seg, slot] = query
    return order, seg, slot, seg_block, seg_query


def _probe(q, a, cols, best, rows_of, start: int, total: int, kappa: int) -> np.ndarray:
    """``U`` per query: the exact distances of the ``kappa`` columns of smallest bound in each of
    its probed blocks ``best`` (R, t); the ``kappa``-th smallest of them bounds the kappa-th
    nearest distance from above (any ``kappa`` gallery vectors do; float64). Blocks of distinct
    groups: the 16 vectors of one block are neighbouring positions of one image, of which only a
    few are near any query, and the column of smallest bound is not always the nearest; the
    best of two blocks gives a ``U`` close enough to the nearest distance that probing more costs
    more than the re-checks it saves (``PROBE``)."""
    r, t = best.shape
    k = min(kappa, BLOCK)
    if t * k < kappa:  # fewer probed vectors than kappa: no upper bound
        return np.full(r, np.inf)
    q_idx = torch.arange(r).repeat_interleave(t)
    y = _bounds(a, cols, q_idx, best.reshape(-1)).view(r, t, BLOCK)
    col = best[:, :, None] * BLOCK + torch.arange(BLOCK)
    y = y.masked_fill(col >= total, float("inf"))
    pick = torch.topk(y, k, dim=2, largest=False).indices
    # A probed block that is the partial last one may hold fewer than k gallery vectors: the
    # padding picked instead has no distance; a query with fewer than kappa gets U = inf.
    real = torch.isfinite(torch.gather(y, 2, pick)).reshape(r, t * k)
    chosen = torch.gather(col, 2, pick).reshape(r, t * k).masked_fill(~real, 0)  # column 0 as a stand-in
    rows = (start + torch.arange(r))[:, None].expand_as(chosen)
    d = pair_distances(q, rows_of, rows.reshape(-1), chosen.reshape(-1)).view(r, t * k)
    d = d.double().masked_fill(~real, float("inf"))
    return torch.topk(d, kappa, dim=1, largest=False).values.amax(dim=1).numpy()


def _candidates(a, cols, block_min, t, total: int, pairs: _Thresholds):
    """(query, gallery column) pairs whose bound passes the query's threshold: super-blocks of
    ``SUPER`` blocks are screened first against the query's threshold ``t``, then blocks, against
    ``t`` and then the block's own threshold (``pairs.block``), then each column's bound is
    recomputed and held to ``t`` and then to the pair's own (``pairs.column``)."""
    n_blocks, r = block_min.shape
    thr = _threshold_bits(t, a.dtype)
    grouped = block_min.view(n_blocks // SUPER, SUPER, r)
    sb, qq = _nonzero(grouped.amin(dim=1) <= thr)
    p, j = _nonzero(grouped[sb, :, qq] <= thr[qq][:, None])
    blocks, qq = sb[p] * SUPER + j, qq[p]
    minima = block_min[blocks, qq]
    keep = (minima < 0) | (minima.view(a.dtype).float() <= pairs.block(qq, blocks))  # a negative one passes
    blocks, qq = blocks[keep], qq[keep]
    found_q, found_col = [], []
    for s in range(0, len(qq), CANDIDATE_BLOCKS):  # bounded temporaries, however many blocks pass
        q_part, b_part = qq[s:s + CANDIDATE_BLOCKS], blocks[s:s + CANDIDATE_BLOCKS]
        y = _bounds(a, cols, q_part, b_part)  # (P, BLOCK)
        p, j = _nonzero(y <= t[q_part][:, None])
        col = b_part[p] * BLOCK + j
        keep = col < total
        q_kept, col, y = q_part[p][keep], col[keep], y[p[keep], j[keep]]
        keep = y <= pairs.column(q_kept, col)
        found_q.append(q_kept[keep])
        found_col.append(col[keep])
    if not found_q:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    return torch.cat(found_q), torch.cat(found_col)
