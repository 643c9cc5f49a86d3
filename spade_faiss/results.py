"""What Spade returns: per-image results, batch results, indexing reports (higher scores =
more anomalous, everywhere)."""

from __future__ import annotations

import dataclasses

import numpy as np

from .images import LoadedImage, Prepared


@dataclasses.dataclass
class ScoredImage:
    """The result for one input (``Spade.iter_score`` yields one per input, in input order).

    Attributes
    ----------
    path : str
        The input's path as given (``"<array>"`` for arrays).
    sample : object
        The input as given (a dataset ``Sample`` keeps its label, mask and defect class).
    score : float or None
        Image score compared with ``tau_``: the ``image_score`` parameter's (by default the
        paper's: the mean of the ``k_image`` smallest squared distances); None on error.
    knn_score, map_score : float or None
        The paper's score, and the map's (mean of its top 1% pixels, or its maximum with
        ``image_score="map_max"``; None without a map): both reported whichever is ``score``.
    is_anomalous : bool or None
        ``score > tau_`` when the detector is calibrated, else None.
    map : float32 (crop, crop) or None
        Smoothed pixel scores; None when no map was asked for (or gating skipped it).
    neighbour_ids : int64 (k_gallery,)
        Store rows of the retrieved normal images, nearest first.
    neighbour_distances : float32 (k_gallery,)
        Their squared L2 distances of pooled vectors.
    neighbour_paths : list of str
        Paths of the ``k_image`` nearest (those whose distances make the score), nearest first.
    image : LoadedImage or None
        The decoded input (original pixels), for pictures.
    error : str or None
        Why the input could not be scored.
    correspondences : dict or None
        When asked for: per level (or ``concat``), int32 (h, w, 3) with, for each location, the
        store row (image id) of its nearest gallery vector and that vector's (row, col) at the
        level's grid. Ties go to the lowest image id, then the lowest position.
    level_scores : dict or None
        With correspondences: per level, float32 (h, w), the mean of the ``kappa`` smallest
        distances at that level (for ``kappa=1``, the distance to the correspondence).
    """

    path: str
    sample: object = None
    score: float | None = None
    is_anomalous: bool | None = None
    map: np.ndarray | None = None
    neighbour_ids: np.ndarray | None = None
    neighbour_distances: np.ndarray | None = None
    neighbour_paths: list = dataclasses.field(default_factory=list)
    image: LoadedImage | None = None
    error: str | None = None
    correspondences: dict | None = None
    level_scores: dict | None = None
    knn_score: float | None = None
    map_score: float | None = None

    @property
    def map_max(self) -> float | None:
        return None if self.map is None else float(self.map.max())


@dataclasses.dataclass
class Retrieved:
    """One query after the backbone and stage 1, before stage 2 (``Spade.retrieve``)."""

    prepared: Prepared
    features: dict  # level -> float32 (h, w, C)
    score: float
    neighbour_ids: np.ndarray
    neighbour_distances: np.ndarray
    map: np.ndarray | None = None
    correspondences: dict | None = None
    level_scores: dict | None = None
    encoded: bool = False  # features already in the stored representations' search space (stored rows)
    knn_score: float | None = None  # the paper's image score (``score`` unless image_score is map-based)
    map_score: float | None = None  # the map's score (scoring.map_score), once it has a map
    error: str | None = None  # why stage 2 could not run (its gallery cannot be read: a damaged corpus)


@dataclasses.dataclass
class SpadeResult:
    """Scores of Q images (``Spade.score``), inputs that failed listed in ``errors``.

    Attributes
    ----------
    paths : list of str, (Q,)
    image_scores : float32 (Q,)
    maps : float32 (Q, crop, crop) or None when no image has a map (rows of images without
        one are zero; see ``segmented``)
    neighbour_ids : int64 (Q, k_gallery), store rows of the retrieved images, nearest first
    neighbour_distances : float32 (Q, k_gallery), squared L2 of pooled vectors
    image_sizes : list of (H, W) of the original images
    segmented : bool (Q,), which images have a map
    is_anomalous : bool (Q,) or None when the detector is not calibrated
    errors : list of (path, reason) for inputs that could not be scored
    correspondences : list (Q,) of per-level dicts (see :class:`ScoredImage`) or None
    """

    paths: list
    image_scores: np.ndarray
    maps: np.ndarray | None
    neighbour_ids: np.ndarray
    neighbour_distances: np.ndarray
    image_sizes: list
    segmented: np.ndarray
    is_anomalous: np.ndarray | None = None
    errors: list = dataclasses.field(default_factory=list)
    correspondences: list | None = None

    @classmethod
    def collect(cls, results: list[ScoredImage], k_gallery: int, crop: int) -> SpadeResult:
        ok = [r for r in results if r.error is None]
        errors = [(r.path, r.error) for r in results if r.error is not None]
        segmented = np.array([r.map is not None for r in ok], dtype=bool)
        maps = None
        if segmented.any():
            maps = np.zeros((len(ok), crop, crop), np.float32)
            for i, r in enumerate(ok):
                if r.map is not None:
                    maps[i] = r.map
        verdicts = [r.is_anomalous for r in ok]
        k_gallery = len(ok[0].neighbour_ids) if ok else k_gallery
        return cls([r.path for r in ok], np.array([r.score for r in ok], np.float32).reshape(-1), maps,
                   np.array([r.neighbour_ids for r in ok], np.int64).reshape(-1, k_gallery),
                   np.array([r.neighbour_distances for r in ok], np.float32).reshape(-1, k_gallery),
                   [r.image.size for r in ok], segmented,
                   None if not ok or verdicts[0] is None else np.array(verdicts, dtype=bool), errors,
                   [r.correspondences for r in ok] if any(r.correspondences for r in ok) else None)


@dataclasses.dataclass
class IndexReport:
    """What an indexing run did."""

    added: int = 0
    duplicates: int = 0
    errors: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
