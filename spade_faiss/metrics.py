"""Evaluation metrics (numpy/scipy only, no torch): image/pixel ROCAUC, AU-PRO to FPR 0.3,
F1-max, and thresholds at a false-positive rate. All exact, ties included.

Conventions for anomalous images with an empty mask (e.g. 4 magnetic_tile "uneven" images):
they are anomalous for image metrics; their pixels are all normal for pixel metrics; they
contribute no region to PRO (only normal pixels to its false-positive rate).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PRO_MAX_FPR = 0.3
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _check_binary(labels: np.ndarray, scores: np.ndarray, what: str):
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores).ravel()
    if labels.size == 0:
        raise ValueError(f"{what}: no samples")
    if labels.shape != scores.shape:
        raise ValueError(f"{what}: {labels.size} labels but {scores.size} scores")
    if labels.all() or not labels.any():
        raise ValueError(f"{what}: needs both normal and anomalous samples, got only "
                         f"{'anomalous' if labels.all() else 'normal'} ({labels.size})")
    if not np.isfinite(scores).all():
        raise ValueError(f"{what}: scores contain nan or inf")
    return labels, scores


def auroc(labels, scores) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + P(=)/2 (Mann-Whitney U / n+ n-).

    Memory: one sorted float copy of the negatives plus the positives.
    """
    labels, scores = _check_binary(labels, scores, "auroc")
    neg = np.sort(scores[~labels])
    pos = scores[labels]
    below = np.searchsorted(neg, pos, side="left").astype(np.float64)
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (pos.size * neg.size))


def roc_curve(labels, scores):
    """(fpr, tpr, thresholds) at every distinct score, thresholds descending (score >= t)."""
    labels, scores = _check_binary(labels, scores, "roc_curve")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # end of each tie group
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return np.r_[0, fp / fp[-1]], np.r_[0, tp / tp[-1]], np.r_[np.inf, s[last]]


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds (score >= t is anomalous) and that threshold."""
    labels, scores = _check_binary(labels, scores, "f1_max")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last].astype(np.float64)
    predicted = last + 1
    f1 = 2 * tp / (predicted + y.sum())
    best = int(np.argmax(f1))
    return float(f1[best]), float(s[last[best]])


def pro_curve(masks, maps, max_fpr: float = PRO_MAX_FPR):
    """Per-region-overlap curve (Bergmann et al.) up to ``max_fpr``, exact at every threshold.

    Regions are the 8-connected components of each ground-truth mask; PRO(t) is the mean over
    all regions of the fraction of the region with score >= t; FPR(t) is over all normal
    pixels of all images.

    Returns
    -------
    fpr, pro : float64 arrays starting at (0, 0), ending at fpr == max_fpr (interpolated)
    """
    masks, maps = _check_maps(masks, maps)
    weights = np.zeros(maps.shape, np.float64)  # per anomalous pixel: 1 / (|region| * n_regions)
    n_regions = 0
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=EIGHT_CONNECTED)
        if n:
            sizes = np.bincount(lab.ravel())
            w = np.where(lab > 0, 1.0 / sizes[lab], 0.0)
            weights[i] = w
            n_regions += n
    if n_regions == 0:
        raise ValueError("pro: no anomalous region in the ground truth")
    normal = ~masks
    n_normal = int(normal.sum())
    if n_normal == 0:
        raise ValueError("pro: no normal pixel in the ground truth")
    # Only pixels above the score where FPR reaches max_fpr matter: keep those (bounded memory).
    k = min(n_normal, int(np.ceil(max_fpr * n_normal)) + 1)
    cut = np.partition(maps[normal], n_normal - k)[n_normal - k]
    keep = maps >= cut
    s = maps[keep]
    w = weights[keep] / n_regions
    neg = normal[keep]
    order = np.argsort(-s, kind="stable")
    s, w, neg = s[order], w[order], neg[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    fpr = np.r_[0.0, np.cumsum(neg)[last] / n_normal]
    pro = np.r_[0.0, np.cumsum(w)[last]]
    stop = np.searchsorted(fpr, max_fpr, side="right")
    if stop < fpr.size:  # interpolate the point at exactly max_fpr
        f0, f1, p0, p1 = fpr[stop - 1], fpr[stop], pro[stop - 1], pro[stop]
        fpr = np.r_[fpr[:stop], max_fpr]
        pro = np.r_[pro[:stop], p0 + (p1 - p0) * (max_fpr - f0) / (f1 - f0)]
    return fpr, pro


def au_pro(masks, maps, max_fpr: float = PRO_MAX_FPR) -> float:
    """Area under the PRO curve up to ``max_fpr``, divided by ``max_fpr`` (1.0 is perfect)."""
    fpr, pro = pro_curve(masks, maps, max_fpr)
    return float(np.trapezoid(pro, fpr) / max_fpr)


def check_fpr(fpr: float) -> float:
    """``fpr`` if it is a false-positive rate a threshold can be set at (0 <= fpr < 1)."""
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr={fpr}: expected 0 <= fpr < 1")
    return fpr


def threshold_at_fpr(normal_scores, fpr: float) -> float:
    """The smallest threshold t such that at most ``fpr`` of the normal scores are > t."""
    s = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise ValueError("threshold_at_fpr: no normal scores")
    check_fpr(fpr)
    allowed = int(np.floor(fpr * s.size))  # how many normals may lie above t
    return float(s[s.size - 1 - allowed])


def _check_maps(masks, maps):
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    if masks.size == 0:
        raise ValueError("no maps")
    return masks, maps


def pixel_auroc(masks, maps) -> float:
    masks, maps = _check_maps(masks, maps)
    return auroc(masks, maps)


def evaluate(labels, image_scores, masks=None, maps=None) -> dict:
    """The anomalib-named metrics: image_AUROC, image_F1Max, and with maps pixel_AUROC,
    pixel_F1Max, AUPRO."""
    out = {"image_AUROC": auroc(labels, image_scores), "image_F1Max": f1_max(labels, image_scores)[0]}
    if maps is not None:
        out.update(pixel_AUROC=pixel_auroc(masks, maps), pixel_F1Max=f1_max(masks, maps)[0],
                   AUPRO=au_pro(masks, maps))
    return out
