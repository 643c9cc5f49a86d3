"""The pruned engine's lower bound as a GEMM: the corpus's principal directions, each vector's
augmented vector ``a(x) = [V^T (x - mu), ||(I - V V^T)(x - mu)||]`` rounded to the operand type,
and the measured rounding ``rho(x)`` that the engine's threshold accounts for (the argument is
in ``pruned.py``).

The float64 arithmetic runs in torch, not numpy: numpy's OpenBLAS threads keep spinning after a
call and slow the torch GEMMs that follow on a small machine (the engine's layer1 1.3x slower)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time

import numpy as np
import torch

PROJ_EPS = 2.0**-19  # float64 projection and residual error, relative to ||x - mu||


@dataclasses.dataclass
class Projection:
    """Mean and top principal directions of one level's features (float64)."""

    mean: np.ndarray  # (C,)
    basis: np.ndarray  # (C, d), orthonormal columns

    @classmethod
    def fit(cls, sample: np.ndarray, dims: int) -> Projection:
        """From a sample (n, C) of corpus vectors; any basis is exact, a good one prunes more."""
        x = torch.from_numpy(np.asarray(sample, dtype=np.float64))
        mean = x.mean(dim=0)
        xc = x - mean
        _, vectors = torch.linalg.eigh(xc.T @ xc)  # ascending eigenvalues
        basis = vectors.flip(1)[:, : min(dims, x.shape[1])].contiguous()
        return cls(mean.numpy(), basis.numpy())

    def leading(self, dims: int) -> Projection:
        """The projection on the first ``dims`` directions (the same as fitting at ``dims``)."""
        if dims >= self.basis.shape[1]:
            return self
        return Projection(self.mean, np.ascontiguousarray(self.basis[:, :dims]))

    def augment(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``a(x) = [p(x), r(x)]`` (n, d+1) float64 and ``||x - mu||`` (n,) of float32 (or
        float16) rows. ``r`` is ``sqrt(||x - mu||^2 - ||p||^2)``: the float64 norms' relative
        errors (~C 2^-53) leave it within ``2^-25 ||x - mu||`` even where the difference cancels,
        well inside ``PROJ_EPS``. (Norms, not squares summed: one pass, no temporaries; a gallery
        miss prepares three levels, 6.7 -> 4.6 ms.)"""
        xc = torch.from_numpy(np.asarray(x)).double().sub_(torch.from_numpy(self.mean))
        p = xc @ torch.from_numpy(self.basis)
        norm = torch.linalg.vector_norm(xc, dim=1)
        projected = torch.linalg.vector_norm(p, dim=1)
        r = (norm * norm - projected * projected).clamp_min(0.0).sqrt()
        return torch.cat([p, r[:, None]], dim=1), norm


# bfloat16 operands: the leading columns of ``a~`` (the top principal directions, where most of
# the features' energy lies) are kept as two bfloat16 parts, ``hi + lo``, 16 significant bits.
# On the user's run (685 magnetic_tile normals, AMX) one bfloat16 part per value made ``rho`` the
# threshold's largest term: layer1 re-checked 563 k pairs per image, 120 k with ``rho`` = 0; the
# first 16 columns carry 97% of ``||a||^2`` and splitting them cuts ``rho`` about 6x (sixteenth wave).
SPLIT = 16


def split_columns(dtype: torch.dtype, width: int) -> int:
    """How many leading columns of an ``a~`` of ``width`` values are kept as two parts."""
    return min(SPLIT, width) if dtype == torch.bfloat16 else 0


@dataclasses.dataclass
class Operands:
    """Query rows of the bound GEMM and their rounding bounds:
    ``[-2 hi, -2 hi[:s], -2 lo, n1, n2, n3, 1, 1, 1]`` (``a~ = hi + lo``, ``lo`` on the first ``s``
    columns, :func:`split_columns`)."""

    rows: torch.Tensor  # (n, m) in the operand dtype
    rho: np.ndarray  # (n,) float64
    norm: np.ndarray  # (n,) float64, ||hi|| + ||lo|| (>= ||a~||)
    low: np.ndarray  # (n,) float64, ||lo|| (0 without split columns)


@dataclasses.dataclass
class GalleryOperands:
    """A gallery image's side of the bound GEMM, kept compact in the gallery cache: ``a~`` in the
    storage type (float16 when the operands are float32: every float16 value is a float32 one,
    so the GEMM's error bound is unchanged and only ``rho`` grows, by about 2^-12 of ``||a||``;
    the operand type itself otherwise, bfloat16 as ``hi`` and the ``split`` leading columns'
    ``lo``) and ``fl32(||a~||^2)``; :func:`gallery_matrix` makes the GEMM rows
    ``[hi, lo, hi[:s], 1, 1, 1, n1, n2, n3]`` of the images a search needs (``values`` first, as kept)."""

    values: torch.Tensor  # (n, d + 1 + split): hi, then lo of the first split columns, in the storage type
    sqnorm: torch.Tensor  # (n,) float32, fl32(||a~||^2)
    rho: np.ndarray  # (n,) float64
    norm: np.ndarray  # (n,) float64, ||hi|| + ||lo|| (>= ||a~||)
    low: np.ndarray  # (n,) float64, ||lo||
    operand: torch.dtype  # the type of the GEMM rows
    split: int = 0  # leading columns kept as two parts

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.sqnorm.nbytes + self.rho.nbytes + self.norm.nbytes + self.low.nbytes


def _rounded(aug: torch.Tensor, dtype: torch.dtype, split: int = 0):
    """``aug`` rounded to ``dtype`` as ``hi`` (n, d + 1) and, on its first ``split`` columns, the
    rounding of what ``hi`` leaves, ``lo`` (n, split): ``a~ = hi + lo``. Returns ``hi``, ``lo``,
    ``fl32(||a~||^2)``, ``||hi|| + ||lo||``, ``||lo||`` and ``rho`` less the projection's own error."""
    hi = aug.to(dtype)
    back = hi.double()
    lo = (aug[:, :split] - back[:, :split]).to(dtype)
    low = lo.double()
    low_norm = low.norm(dim=1)
    magnitude = back.norm(dim=1) + low_norm  # ||hi|| + ||lo||, before back becomes a~
    back[:, :split] += low  # exact in float64: a~
    norm = back.norm(dim=1)
    return hi, lo, (norm * norm).float(), magnitude.numpy(), low_norm.numpy(), (back - aug).norm(dim=1).numpy()


# float16 holds a~ exactly enough below this magnitude (its largest finite value is 65504)
FLOAT16_SAFE = 2.0**15


def make_operands(projection: Projection, x: np.ndarray, dtype: torch.dtype) -> Operands:
    """Query rows ``[-2 hi, -2 hi[:s], -2 lo, n1, n2, n3, 1, 1, 1]`` (``n1 + n2 + n3 =
    fl32(||a~||^2)`` exactly), so that a row times a gallery row of :func:`gallery_matrix` is
    ``||a~(q) - a~(g)||^2 + 2 lo(q).lo(g)`` (the one product of low parts left out)."""
    aug, centred_norm = projection.augment(x)
    split = split_columns(dtype, aug.shape[1])
    hi, lo, sq, norm, low, err = _rounded(aug, dtype, split)
    rows = torch.cat([-2 * hi, -2 * hi[:, :split], -2 * lo, norm_parts(sq, dtype),
                      torch.ones(len(aug), 3, dtype=dtype)], dim=1)
    return Operands(rows.contiguous(), err + PROJ_EPS * centred_norm.numpy(), norm, low)


def make_gallery_operands(projection: Projection, x: np.ndarray, dtype: torch.dtype) -> GalleryOperands:
    """A gallery image's compact operands for a GEMM in ``dtype`` (see :class:`GalleryOperands`)."""
    aug, centred_norm = projection.augment(x)
    small = dtype == torch.float32 and bool(aug.abs().max() < FLOAT16_SAFE) if len(aug) else False
    split = split_columns(dtype, aug.shape[1])
    hi, lo, sq, norm, low, err = _rounded(aug, torch.float16 if small else dtype, split)
    return GalleryOperands(torch.cat([hi, lo], dim=1).contiguous(), sq, err + PROJ_EPS * centred_norm.numpy(), norm,
                           low, dtype, split)


def gallery_matrix(ops: list[GalleryOperands], pad: int, pad_norm: float, buffer: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The gallery rows ``[hi, lo, hi[:s], 1, 1, 1, n1, n2, n3]`` of ``ops`` stacked in the
    operand type, and ``pad`` rows whose squared norm is ``pad_norm`` (they never pass a
    threshold); in ``buffer`` (uint8, large enough: :func:`workspace`) when given. Every value is
    written: a reused buffer needs no zeroing, and a fresh one no page faults of its own (a new
    40 MB matrix per layer1 search cost ~8 ms of faults; the layout with ``values`` first copies
    each image once)."""
    dtype, split = ops[0].operand, ops[0].split
    n = sum(len(o.values) for o in ops)
    kept = ops[0].values.shape[1]  # d + 1 + split: hi, then lo
    full = kept - split
    width = full + 2 * split + 6
    if buffer is None:
        out = torch.empty(n + pad, width, dtype=dtype)
    else:
        out = buffer[: (n + pad) * width * dtype.itemsize].view(dtype).view(n + pad, width)
    at = 0
    for o in ops:
        out[at:at + len(o.values), :kept] = o.values  # float16 -> float32 is exact
        at += len(o.values)
    out[:n, kept:kept + split] = out[:n, :split]
    out[:, width - 6:width - 3] = 1
    out[:n, width - 3:] = norm_parts(torch.cat([o.sqnorm for o in ops]), dtype)
    if pad:
        out[n:, :width - 6] = 0
        out[n:, width - 3] = pad_norm
        out[n:, width - 2:] = 0
    return out


_free: list[torch.Tensor] = []  # buffers given back (at most KEPT_BUFFERS, the largest)
_free_lock = threading.Lock()
KEPT_BUFFERS = 2


@contextlib.contextmanager
def workspace(nbytes: int):
    """A uint8 buffer of at least ``nbytes`` for one search's gallery matrix, reused from one
    search to the next (a pool: concurrent searches, e.g. a service's corpora, take one each)."""
    with _free_lock:
        fits = [i for i, b in enumerate(_free) if b.numel() >= nbytes]
        buffer = _free.pop(min(fits, key=lambda i: _free[i].numel())) if fits else None
    if buffer is None:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
    try:
        yield buffer
    finally:
        with _free_lock:
            _free.append(buffer)
            _free.sort(key=torch.Tensor.numel, reverse=True)
            del _free[KEPT_BUFFERS:]


def norm_parts(n32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n,) float32 -> (n, 3) in ``dtype`` whose exact sum is the float32 value."""
    if dtype == torch.float32:
        return torch.stack([n32, torch.zeros_like(n32), torch.zeros_like(n32)], dim=1)
    s1 = n32.to(dtype)
    r1 = n32 - s1.float()  # exact: the low bits of n32
    s2 = r1.to(dtype)
    s3 = (r1 - s2.float()).to(dtype)  # at most 8 significant bits are left: exact
    return torch.stack([s1, s2, s3], dim=1)


@dataclasses.dataclass
class PreparedImage:
    """One gallery image at one level, ready for the engine (kept in the gallery cache)."""

    feats: torch.Tensor  # (n, C) the exact values, as stored (float16 or float32)
    ops: GalleryOperands
    shape: tuple  # (h, w)
    fingerprint: int

    @property
    def nbytes(self) -> int:
        return self.feats.nbytes + self.ops.nbytes


def prepare_image(projection: Projection, feats: np.ndarray, dtype: torch.dtype) -> PreparedImage:
    """``feats`` (h, w, C) -> the image's operands, exact rows and fingerprint."""
    h, w, c = feats.shape
    flat = np.ascontiguousarray(feats.reshape(h * w, c))
    return PreparedImage(torch.from_numpy(flat), make_gallery_operands(projection, flat, dtype), (h, w),
                         hash(flat[:: max(1, len(flat) // 64)].tobytes()))


# The environment variable the command line reads to force an operand type (benchmarks);
# the library itself reads no environment: an entry point calls force_operand.
OPERAND_VARIABLE = "SPADE_FAISS_BOUND_DTYPE"
OPERANDS = ("float32", "bfloat16")
_forced: str | None = None


def force_operand(name: str | None) -> None:
    """Take operand type ``name`` (``float32``/``bfloat16``) from now on without measuring, or
    measure again (None). Called by entry points (``spade-faiss`` reads ``SPADE_FAISS_BOUND_DTYPE``)."""
    global _forced
    if name not in (None, *OPERANDS):
        raise ValueError(f"{OPERAND_VARIABLE}={name!r}: expected one of {list(OPERANDS)}")
    _forced = name
    operand_dtype.cache_clear()


@functools.lru_cache(maxsize=1)
def operand_dtype() -> torch.dtype:
    """The operand type of the bound GEMMs on this machine, chosen once per process:
    bfloat16 only where the CPU multiplies it natively (AVX512_BF16 or AMX) *and* a product of
    the engine's shape measures faster in it than in float32 (the rate varies 2.4x between
    machines of one kind); else float32. The results are the same either way (the bounds are
    rigorous for each type, docs/design.md §4); only the speed differs."""
    if _forced is not None:
        return getattr(torch, _forced)
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((ln for ln in f if ln.startswith("flags")), "").split())
    except OSError:
        flags = set()
    if not flags & {"avx512_bf16", "amx_bf16"}:
        return torch.float32
    return min((torch.bfloat16, torch.float32), key=_bound_gemm_seconds)


def _bound_gemm_seconds(dtype: torch.dtype, m: int = 2048, n: int = 8192, k: int = 96, repeat: int = 3) -> float:
    """The fastest of ``repeat`` bound-shaped products (layer1's grid against a gallery block,
    the projected width) in ``dtype``: about 3 GFLOP, tens of milliseconds."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b.T, out=out)  # first call: kernel selection, page faults
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        torch.mm(a, b.T, out=out)
        best = min(best, time.perf_counter() - t)
    return best
