"""The thresholds of an attached corpus: calibration at a false-positive rate on held-out normal
images, and a calibration-free estimate of the pixel threshold for pictures (functions of
:class:`~spade_faiss.detector.attached.AttachedCorpus`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import numpy as np

from .. import metrics, temporal
from .. import scoring as scoring_lib
from ..config import DEFAULTS, K_IMAGE_DEFAULT
from ..results import ScoredImage
from .attached import AttachedCorpus
from .pipeline import spread_rows

# A threshold this many times the median held-out score says the held-out set holds outliers.
OUTLIER_RATIO = 10.0
# Corpus images whose leave-one-out stage-1 scores describe what the corpus's normals score.
CORPUS_SAMPLE = 256


def calibrate(corpus: AttachedCorpus, results: Iterable[ScoredImage], fpr: float, scoring: dict,
              event_s: float = DEFAULTS["event_s"]) -> dict:
    """The thresholds at ``fpr`` over held-out normal images (``results``: their scored
    images, maps included), stored in the corpus; returns the record. Held-out frames of videos
    also choose the temporal smoothing width (``record["temporal"]``, ``temporal.choose_sigma``
    for events of ``event_s`` seconds).

    Images already in the corpus are refused: their distances to themselves are 0, which would
    give thresholds that flag every new normal image."""
    metrics.check_fpr(fpr)
    indexed = set(corpus.store.sha256s())
    paths, scores, stage1, maps, errors = [], [], [], [], []
    for r in results:
        if r.error:
            errors.append(r.error)
            continue
        if r.image.sha256 in indexed:
            raise ValueError(f"{r.path} is in the corpus: calibrate on held-out normal images that "
                             f"were not indexed (e.g. hold out every 10th image before `index`)")
        paths.append(r.path)
        scores.append(r.score)
        stage1.append(r.score if r.knn_score is None else r.knn_score)  # what the corpus's own scores compare with
        maps.append(r.map)
    if not scores:
        raise ValueError("calibrate: none of the normal images could be scored")
    tau = metrics.threshold_at_fpr(scores, fpr)
    above = int(np.sum(np.asarray(scores) > tau))
    spread = score_spread(scores)
    corpus_spread = score_spread(corpus_scores(corpus, scoring)) if len(corpus.store) > 2 else None
    record = {"tau": tau, "theta": metrics.threshold_at_fpr(np.stack(maps), fpr), "fpr": fpr,
              "n_images": len(scores), "images_above_tau": above, "held_out_scores": spread,
              "corpus_scores": corpus_spread, "skipped": errors, "scoring": scoring}
    if temporal.sequences(paths, scores):
        try:
            record["temporal"] = temporal.choose_sigma(paths, scores, fpr, event_s)
        except ValueError as e:
            warnings.warn(f"calibrate: {e}", stacklevel=3)
    for message in diagnose(scores, tau, above, fpr, corpus_spread, stage1):
        warnings.warn(f"calibrate: {message}", stacklevel=3)
    corpus.store.write_thresholds(record)
    return record


def score_spread(scores) -> dict:
    """Quartiles and extremes of image scores (printed by ``calibrate``, kept in the record)."""
    q = np.quantile(np.asarray(scores, np.float64), [0.0, 0.25, 0.5, 0.75, 1.0])
    return dict(zip(("min", "q25", "median", "q75", "max"), (float(round(v, 6)) for v in q)))


def corpus_scores(corpus: AttachedCorpus, scoring: dict, sample: int = CORPUS_SAMPLE) -> np.ndarray:
    """Stage-1 image scores of up to ``sample`` corpus images (evenly spaced rows) against the rest
    of the corpus, each one's own row left out: what a normal image like the corpus's scores."""
    n = len(corpus.store)
    rows = spread_rows(n, sample)
    k_gallery = min(scoring["k_gallery"], n - 1)
    k_image = min(scoring["k_image"] or K_IMAGE_DEFAULT, k_gallery)
    dist, ids = corpus.index.search(corpus.store.pool()[rows], k_gallery + 1, scoring["nprobe"])
    kept = np.stack([d[i != row][:k_gallery] for d, i, row in zip(dist, ids, rows)])
    return scoring_lib.image_scores(kept, k_image)


def diagnose(scores, tau: float, above: int, fpr: float, corpus: dict | None, stage1=None) -> list[str]:
    """Why thresholds calibrated on these held-out scores may mislead (empty: no reason seen):
    too few images for ``fpr``; tau far above the median; tau resting on far-out scores (Tukey's
    outer fence, q75 + 3 IQR); held-out images unlike the corpus's own images (the median of
    their stage-1 scores ``stage1``, the knn scores, default ``scores``, outside the corpus's
    leave-one-out scores' range)."""
    stage1_median = float(np.median(np.asarray(scores if stage1 is None else stage1, np.float64)))
    scores = np.sort(np.asarray(scores, np.float64))
    out = []
    needed = math.ceil(1 / fpr) if fpr > 0 else None
    if needed and len(scores) < needed:
        out.append(f"{len(scores)} held-out images cannot support fpr={fpr} (about {needed} are needed): tau is the "
                   f"largest of their scores ({above} above it); give more held-out normal images, or a larger --fpr")
    median = float(np.median(scores))
    if median > 0 and tau > OUTLIER_RATIO * median:
        out.append(f"tau={tau:.4g} is {tau / median:.0f}x the median held-out score ({median:.4g}): some held-out "
                   f"images are far from the corpus; are they all normal?")
    q25, q75 = np.quantile(scores, [0.25, 0.75])
    fence = q75 + 3 * (q75 - q25)
    far = int(np.sum(scores > fence))
    if len(scores) >= 4 and far and tau > fence:
        out.append(f"tau={tau:.4g} rests on {far} far-out held-out score(s) (above {fence:.4g} = q75 + 3 IQR; the "
                   f"median is {median:.4g}): look at those images: one unusual normal image sets the threshold "
                   f"for every test image")
    if corpus is not None and not corpus["min"] <= stage1_median <= corpus["max"]:
        side = "above" if stage1_median > corpus["max"] else "below"
        out.append(f"the held-out images look unlike the corpus: their median stage-1 score {stage1_median:.4g} is "
                   f"{side} every "
                   f"score of the corpus's own images against the rest ({corpus['min']:.4g}..{corpus['max']:.4g}); "
                   f"hold out a random sample of the normals (`spade-faiss index --hold-out 0.1`), not one "
                   f"session or the last files by name")
    return out


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
    stored = corpus.store.records.leave_one_out_theta()
    if stored is not None and {k: v for k, v in stored.items() if k != "theta"} == key:
        theta = stored["theta"]
    else:
        theta = corpus.pipeline.leave_one_out_theta(n_images, fpr, config, options, device)
        if corpus.store.writable:
            corpus.store.records.write_leave_one_out_theta({**key, "theta": theta})
    corpus.memo["colour_scale"] = (key, theta)
    return theta
