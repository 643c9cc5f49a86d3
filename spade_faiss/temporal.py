"""Scores over time: the frame scores of each video smoothed along its frame sequence (the
paper's video setting; docs/design.md, "Videos"), and the smoothing width chosen on normal
frames only.

Each video's sampled frames, in frame order, form one sequence (a resumed or sharded run's rows
are gathered first); its scores are smoothed by a Gaussian of ``sigma`` sampled frames
(``scipy.ndimage.gaussian_filter1d``, ``mode="nearest"``: the ends repeat their value, truncate
4 sigma). ``sigma=0`` leaves them as they are. Frames of different videos never mix.

**Choosing sigma** (:func:`choose_sigma`, run by ``calibrate`` on held-out normal videos; no test
frame or label is an input). Smoothing lowers the normal frames' spread (a lower threshold) and
also an event's peak (a short event is averaged with the normal frames around it). For the
shortest event the user wants caught (``event_s`` seconds, i.e. ``E`` sampled frames), the
score increase such an event needs to reach the threshold at its middle is::

    need(sigma) = (tau(sigma) - median(sigma)) / response(sigma, E)

``tau(sigma)``: the threshold at ``fpr`` of the normal frames smoothed by ``sigma`` (only frames
at least the kernel's radius from a video's ends: their smoothed value averages real frames,
not repeated ends), ``median(sigma)`` their median, ``response(sigma, E)``: the smoothed value at
the middle of a box of ``E`` ones in zeros (1 at ``sigma=0``). The width chosen is the one of
:data:`SIGMAS` with the smallest ``need`` (the smaller width on a tie); widths that leave fewer
than :data:`MIN_FRAMES` such frames are not tried. The record keeps every width's figures, so a
user can audit the choice.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

from .config import check_values
from .metrics import threshold_at_fpr
from .video import parse_ref

# The widths (in sampled frames) calibrate tries.
SIGMAS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
# Fewest normal frames (away from the videos' ends) a width's threshold may rest on.
MIN_FRAMES = 20


def sequences(paths: list[str], scores: list[float]) -> dict[str, list[tuple[int, str, float, float | None]]]:
    """``{video: [(frame, path, score, time_s), ...] in frame order}`` for the frame references
    among ``paths`` (other paths are left out)."""
    videos: dict[str, list[tuple[int, str, float, float | None]]] = {}
    for path, score in zip(paths, scores):
        ref = parse_ref(path)
        if ref is not None:
            videos.setdefault(ref.video, []).append((ref.frame, path, float(score), ref.time_s))
    for frames in videos.values():
        frames.sort(key=lambda f: f[0])
    return videos


def smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """One video's scores smoothed (the module's Gaussian; ``sigma=0``: as they are)."""
    values = np.asarray(values, np.float64)
    return gaussian_filter1d(values, sigma, mode="nearest") if sigma > 0 else values


def radius(sigma: float) -> int:
    """How many frames on each side the Gaussian reaches (scipy's truncation at 4 sigma)."""
    return int(4.0 * sigma + 0.5)


def smooth_frames(paths: list[str], scores: list[float], sigma: float) -> dict[str, float]:
    """``{frame path: smoothed score}`` for the frame references among ``paths`` (other paths
    are left out), each video smoothed along its own frame order."""
    check_values({"temporal_sigma": sigma})
    out = {}
    for frames in sequences(paths, scores).values():
        smoothed = smooth([f[2] for f in frames], sigma)
        out.update({f[1]: float(v) for f, v in zip(frames, smoothed)})
    return out


def response(sigma: float, event_frames: int) -> float:
    """The smoothed value at the middle of an event of ``event_frames`` sampled frames that
    raises the score by 1 over a level of 0."""
    if sigma == 0:
        return 1.0
    r = radius(sigma)
    box = np.zeros(event_frames + 2 * r + 2)
    box[r + 1:r + 1 + event_frames] = 1.0
    return float(gaussian_filter1d(box, sigma, mode="constant")[r + 1 + (event_frames - 1) // 2])


def frame_period(videos: dict) -> float:
    """Seconds between consecutive sampled frames (the median over the videos' frame times)."""
    steps = [b[3] - a[3] for frames in videos.values() for a, b in zip(frames, frames[1:])
             if a[3] is not None and b[3] is not None and b[3] > a[3]]
    if not steps:
        raise ValueError("the frames carry no times (or no video has two sampled frames): the smoothing width "
                         "cannot be chosen for an event in seconds; pass --temporal-sigma to score")
    return float(np.median(steps))


def choose_sigma(paths: list[str], scores: list[float], fpr: float, event_s: float,
                 sigmas=SIGMAS) -> dict:
    """The smoothing width for normal frames ``paths`` with ``scores`` (module docstring): a
    record ``{"sigma", "tau", "event_s", "event_frames", "frame_period_s", "frames", "fpr",
    "tried": [{"sigma", "tau", "median", "need", "frames"}, ...]}``; ``tau`` is the threshold
    of the smoothed normal frames at ``fpr`` (what a smoothed frame score is compared with)."""
    check_values({"event_s": event_s})
    videos = sequences(paths, scores)
    if not videos:
        raise ValueError("no video frames among the held-out normals")
    period = frame_period(videos)
    event = max(1, int(round(event_s / period)))
    tried = []
    for sigma in sigmas:
        check_values({"temporal_sigma": sigma})
        r = radius(sigma)
        inner = [smooth([f[2] for f in frames], sigma)[r:len(frames) - r] for frames in videos.values()]
        values = np.concatenate(inner)
        if values.size < MIN_FRAMES:
            continue
        tau, median = threshold_at_fpr(values, fpr), float(np.median(values))
        tried.append({"sigma": float(sigma), "tau": tau, "median": median,
                      "need": (tau - median) / response(sigma, event), "frames": int(values.size)})
    if not tried:
        raise ValueError(f"fewer than {MIN_FRAMES} held-out normal video frames: the smoothing width cannot be "
                         f"chosen; pass --temporal-sigma to score")
    best = min(tried, key=lambda t: (t["need"], t["sigma"]))
    return {"sigma": best["sigma"], "tau": best["tau"], "event_s": float(event_s), "event_frames": event,
            "frame_period_s": period, "frames": sum(len(f) for f in videos.values()), "fpr": fpr, "tried": tried}


def in_force(sigma: float | None, calibration: dict | None, tau: float | None,
             tau_given: bool) -> tuple[float, float | None, str]:
    """The smoothing of a score run's frames: ``(sigma, tau of the smoothed scores, where sigma
    came from)``. A width the user gave is used with the image threshold ``tau``; else the one
    calibrated on normal videos, with its own threshold (unless the user gave ``tau``); else
    none."""
    chosen = (calibration or {}).get("temporal")
    if sigma is not None:
        check_values({"temporal_sigma": sigma})
        return float(sigma), tau, "--temporal-sigma"
    if chosen:
        return chosen["sigma"], tau if tau_given else chosen["tau"], "calibration"
    return 0.0, tau, "none"
