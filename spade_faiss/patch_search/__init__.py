"""Stage 2 (docs/design.md §1, §4): for every query location, the ``kappa`` smallest squared distances to
the locations of the retrieved images (the gallery). Engines, one contract:

- ``pruned`` (``pruned.py``): exact, with lower bounds that skip most pairs and bfloat16
  products with a rigorous error bound; the CPU default.
- ``faiss`` (``brute.py``): exact brute force on CPU (``faiss.knn``) or GPU (``faiss.knn_gpu``).
- ``dense`` (``dense.py``): every pair through a float32 GEMM, then an exact re-check, CPU only;
  the same result as ``pruned`` bit for bit; ``auto`` uses it for the small levels where the
  pruned engine's fixed costs exceed what it saves.
- ``window`` (``window.py``): opt-in approximation, each location compared only with the gallery
  locations within a radius of its own position (exact within that contract).

``exact.py`` computes the distances the ``pruned``, ``dense`` and ``window`` engines (and the
tests) trust. Those engines also give each location's nearest gallery vector (its
correspondence); asking for correspondences makes ``auto`` use them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..config import DEFAULTS
from . import dense, pruned, window
from .brute import gpu_available, iter_chunks, knn_mean, level_maps, resolve_search_device
from .pruned import Projection, SearchStats


@dataclass(frozen=True)
class SearchSettings:
    """How stage 2 runs: the same for every level and every query of a run."""

    device: str = "cpu"  # where the faiss engine searches ("cpu", "cuda[:N]")
    chunk_bytes: int = DEFAULTS["chunk_bytes"]
    gpu_float16: bool = DEFAULTS["gpu_float16"]
    radius: int = DEFAULTS["radius"]

    @property
    def keep_float16(self) -> bool:
        """Whether brute force on a GPU gets the gallery in float16 (else float32 once, at load)."""
        return self.device != "cpu" and self.gpu_float16


@dataclass
class LevelSearch:
    """One stage-2 search: a level's query images against its gallery.

    ``query``: float32 (B, h, w, C); ``gallery``: per-image entries made by :func:`prepare` for
    the same engine; ``projection``: the pruned engine's; ``stats``: where it counts its work.
    """

    query: np.ndarray
    gallery: list
    kappa: int
    projection: Projection | None = None
    stats: SearchStats | None = None


@dataclass(frozen=True)
class Engine:
    """A stage-2 engine: how it keeps a gallery image, and how it searches."""

    prepare: Callable[[np.ndarray, Projection | None, bool], object]  # (feats, projection, keep_float16)
    search: Callable[[LevelSearch, SearchSettings], tuple]
    projected: bool = False  # prepares and searches with the level's principal directions


def _faiss_search(req: LevelSearch, s: SearchSettings):
    # One query image at a time, so that an image's result does not depend on which images
    # share its gallery (BLAS blocks by the number of query rows).
    return np.concatenate([level_maps(q[None], req.gallery, req.kappa, s.device, s.chunk_bytes, s.gpu_float16)
                           for q in req.query]), None


ENGINE_TABLE = {
    "pruned": Engine(lambda f, proj, keep16: pruned.prepare_image(proj, f, pruned.operand_dtype()),
                     lambda r, s: pruned.search(r.query, r.gallery, r.kappa, r.projection, r.stats), projected=True),
    "dense": Engine(lambda f, proj, keep16: dense.prepare_image(f),
                    lambda r, s: dense.search(r.query, r.gallery, r.kappa)),
    "faiss": Engine(lambda f, proj, keep16: f if keep16 else np.asarray(f, dtype=np.float32), _faiss_search),
    # The exact values as stored, converted per comparison.
    "window": Engine(lambda f, proj, keep16: f, lambda r, s: window.search(r.query, r.gallery, r.kappa, s.radius)),
}
ENGINES = tuple(ENGINE_TABLE)


def needs_projection(engine: str) -> bool:
    """Whether ``engine`` needs the level's principal directions (a fitted projection) to prepare and search."""
    return ENGINE_TABLE[engine].projected
# Below this much brute-force work per query image (GFLOP), the pruned engine's fixed costs
# (projections, screening, re-checks) exceed what it saves: ``auto`` uses dense there. Measured
# on Wide-ResNet50-2 (benchmarks/README.md): layer3 at K=5 (0.4 GFLOP) dense 4.5 ms vs pruned
# 6.9; at K=10 (0.8) 9.9 vs 7.8; everything larger is pruned's by far.
PRUNED_MIN_GFLOP = 0.6
# Width of the pruned engine's bound GEMM by grid size: a large grid makes the GEMM dominate
# (a narrow one is cheaper), a small grid makes the exact re-checks dominate (a wide bound
# leaves fewer). Measured on layer1/2/3 of Wide-ResNet50-2 (benchmarks/README.md).
WIDTHS = ((2048, 96), (512, 192), (0, 256))
# With float32 operands (a CPU without native bfloat16) the bound GEMM is bound by its FLOPs,
# not by writing its output as with AMX bfloat16, so a large grid is fastest with a narrower
# bound than WIDTHS: layer1 at width 80 (73 dimensions), 10% faster than 64 and 96 once each
# query's U came from eight probed blocks (pruned.PROBE, now 2; real magnetic_tile neighbours, 12
# queries, interleaved same-process rounds on a 2-core AVX2 EPYC: 15.5 s against 17.1 at 64;
# before the probe, 64 was the fastest: benchmarks/README.md); layer2 at 112 (105 dimensions)
# 0.067-0.070 s against 0.089-0.096 at 192 (96-128 within noise of 112). Never wider than
# WIDTHS: the basis kept in the corpus is fitted at those, and narrower ones are its first columns.
FLOAT32_WIDTHS = ((2048, 80), (512, 112), (0, 256))


def resolve_engine(stage2: str, device: str) -> str:
    """``auto`` -> ``pruned`` on the CPU (``dense`` for small levels, see :func:`level_engine`),
    ``faiss`` on a GPU."""
    if stage2 == "auto":
        return "pruned" if device == "cpu" else "faiss"
    if stage2 in ("pruned", "dense") and device != "cpu":
        raise ValueError(f"stage2={stage2!r} runs on the CPU, the device is {device!r}: use stage2='faiss' or 'auto'")
    return stage2


def level_engine(stage2: str, device: str, shape: tuple, k_gallery: int, window: int | None = None,
                 correspondences: bool = False) -> str:
    """The engine for one level of grid ``shape`` = (h, w, C): ``window`` for a window search
    (``window``: its radius, :attr:`SpadeConfig.window`; None: the exact search) whose radius
    does not cover the grid; else as :func:`resolve_engine`, except that ``auto`` on
    the CPU leaves small levels (brute force under ``PRUNED_MIN_GFLOP`` per query image) to
    ``dense``, and that correspondences need an engine that finds the nearest vector (pruned or
    dense, on the CPU whatever the device). The choice depends on the configuration only, never
    on the batch."""
    h, w, c = shape
    if window is not None and window < max(h, w) - 1:
        return "window"
    small = 2 * (h * w) ** 2 * k_gallery * c < PRUNED_MIN_GFLOP * 1e9
    if correspondences:
        return stage2 if stage2 in ("pruned", "dense") else "dense" if small else "pruned"
    engine = resolve_engine(stage2, device)
    return "dense" if stage2 == "auto" and engine == "pruned" and small else engine


def projection_dims(grid: int, operand: torch.dtype | None = None) -> int:
    """Projected dimensions of the pruned engine for a level with ``grid`` locations: those of
    the basis fitted and kept in the corpus (``operand`` None), or those its bound GEMM uses with
    operands of type ``operand`` (the fitted basis's first columns: the top principal directions)."""
    table = FLOAT32_WIDTHS if operand == torch.float32 else WIDTHS
    return next(w for size, w in table if grid >= size) - 7


def prepare(engine: str, feats: np.ndarray, projection: Projection | None, keep_float16: bool = False):
    """A gallery image's features (h, w, C) as ``engine`` keeps them in the gallery cache
    (``keep_float16``: :attr:`SearchSettings.keep_float16`, the one setting a prepared image
    depends on)."""
    return ENGINE_TABLE[engine].prepare(feats, projection, keep_float16)


def search_level(engine: str, request: LevelSearch, settings: SearchSettings = SearchSettings()):
    """Mean of the ``kappa`` smallest squared distances of each query location, float32 (B, h, w),
    and the nearest gallery vector of each, int64 (B, h, w, 2) = (gallery image index, flat
    position), or None from the faiss engine."""
    return ENGINE_TABLE[engine].search(request, settings)


__all__ = ["ENGINES", "ENGINE_TABLE", "Engine", "LevelSearch", "Projection", "SearchSettings", "SearchStats",
           "gpu_available", "iter_chunks", "knn_mean", "level_engine", "level_maps", "prepare", "projection_dims",
           "resolve_engine", "resolve_search_device", "search_level"]
