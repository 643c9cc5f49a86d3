"""The thresholds of an attached corpus: calibration at a false-positive rate on held-out normal
images, and a calibration-free estimate of the pixel threshold for pictures (functions of
:class:`~spade_faiss.detector.attached.AttachedCorpus`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import numpy as np

from .. import metrics
from ..results import ScoredImage
from .attached import AttachedCorpus

# A threshold this many times the median held-out score says the held-out set holds outliers.
OUTLIER_RATIO = 10.0


def calibrate(corpus: AttachedCorpus, results: Iterable[ScoredImage], fpr: float, scoring: dict) -> dict:
    """The thresholds at ``fpr`` over held-out normal images (``results``: their scored
    images, maps included), stored in the corpus; returns the record.

    Images already in the corpus are refused: their distances to themselves are 0, which would
    give thresholds that flag every new normal image."""
    metrics.check_fpr(fpr)
    indexed = set(corpus.store.sha256s())
    scores, maps, errors = [], [], []
    for r in results:
        if r.error:
            errors.append(r.error)
            continue
        if r.image.sha256 in indexed:
            raise ValueError(f"{r.path} is in the corpus: calibrate on held-out normal images that "
                             f"were not indexed (e.g. hold out every 10th image before `index`)")
        scores.append(r.score)
        maps.append(r.map)
    if not scores:
        raise ValueError("calibrate: none of the normal images could be scored")
    tau = metrics.threshold_at_fpr(scores, fpr)
    above = int(np.sum(np.asarray(scores) > tau))
    record = {"tau": tau, "theta": metrics.threshold_at_fpr(np.stack(maps), fpr), "fpr": fpr,
              "n_images": len(scores), "images_above_tau": above, "skipped": errors, "scoring": scoring}
    _warn(scores, tau, above, fpr)
    corpus.store.write_thresholds(record)
    return record


def _warn(scores: list[float], tau: float, above: int, fpr: float) -> None:
    needed = math.ceil(1 / fpr) if fpr > 0 else None
    if needed and len(scores) < needed:
        warnings.warn(f"calibrate: {len(scores)} held-out images cannot support fpr={fpr} (about {needed} are "
                      f"needed): tau is the largest of their scores ({above} above it); give more held-out "
                      f"normal images, or a larger --fpr", stacklevel=3)
    median = float(np.median(scores))
    if median > 0 and tau > OUTLIER_RATIO * median:
        warnings.warn(f"calibrate: tau={tau:.4g} is {tau / median:.0f}x the median held-out score ({median:.4g}): "
                      f"some held-out images are far from the corpus; are they all normal?", stacklevel=3)


def leave_one_out_theta(corpus: AttachedCorpus, config, options, device: str, n_images: int, fpr: float) -> float:
    """A pixel threshold estimated without held-out images (see
    :meth:`QueryPipeline.leave_one_out_theta`): a calibration-free colour scale for pictures.
    Kept per corpus size and scoring parameters, in the attached state and, when this process
    may write the corpus file, in the file (``index`` stores it, so that a one-image ``score``
    process does not pay for it)."""
    corpus.check_ready()
    key = {"images": len(corpus.store), "n_images": n_images, "fpr": fpr, "scoring": config.scoring_dict()}
    memo = corpus.memo.get("colour_scale")
    if memo is not None and memo[0] == key:
        return memo[1]
    stored = corpus.store.leave_one_out_theta()
    if stored is not None and {k: v for k, v in stored.items() if k != "theta"} == key:
        theta = stored["theta"]
    else:
        theta = corpus.pipeline.leave_one_out_theta(n_images, fpr, config, options, device)
        if corpus.store.writable:
            corpus.store.write_leave_one_out_theta({**key, "theta": theta})
    corpus.memo["colour_scale"] = (key, theta)
    return theta
