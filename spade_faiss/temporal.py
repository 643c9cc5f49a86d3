"""Scores over time: the frame scores of each video smoothed along its frame sequence (the
paper's video setting; docs/design.md, "Videos").

Each video's sampled frames, in frame order, form one sequence (a resumed or sharded run's rows
are gathered first); its scores are smoothed by a Gaussian of ``sigma`` sampled frames
(``scipy.ndimage.gaussian_filter1d``, ``mode="nearest"``: the ends repeat their value, truncate
4 sigma). ``sigma=0`` leaves them as they are. Frames of different videos never mix.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

from .video import parse_ref


def smooth_frames(paths: list[str], scores: list[float], sigma: float) -> dict[str, float]:
    """``{frame path: smoothed score}`` for the frame references among ``paths`` (other paths
    are left out), each video smoothed along its own frame order."""
    if not (np.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"temporal_sigma={sigma!r}: expected a number of frames >= 0")
    videos: dict[str, list[tuple[int, str, float]]] = {}
    for path, score in zip(paths, scores):
        ref = parse_ref(path)
        if ref is not None:
            videos.setdefault(ref.video, []).append((ref.frame, path, float(score)))
    out = {}
    for frames in videos.values():
        frames.sort()
        values = np.array([s for _, _, s in frames], np.float64)
        smoothed = gaussian_filter1d(values, sigma, mode="nearest") if sigma > 0 else values
        out.update({path: float(v) for (_, path, _), v in zip(frames, smoothed)})
    return out
