"""Image scores and pixel maps from search distances (SPEC 1.1): score, upsample, average,
smooth, and place back onto the original image. Higher = more anomalous."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter

from .resample import bilinear


def image_scores(distances: np.ndarray, k_image: int) -> np.ndarray:
    """Mean of the ``k_image`` smallest squared distances per query.

    Parameters
    ----------
    distances : (Q, K) squared L2 distances to the retrieved images, ascending
    k_image : int, ``<= K``

    Returns
    -------
    float32 (Q,)
    """
    if not 1 <= k_image <= distances.shape[1]:
        raise ValueError(f"k_image={k_image}: expected 1..{distances.shape[1]}")
    return distances[:, :k_image].mean(axis=1, dtype=np.float64).astype(np.float32)


def assemble_maps(level_maps: Sequence[np.ndarray], crop: int) -> np.ndarray:
    """Upsample each level's (B, h, w) map to (crop, crop) bilinearly and average the levels
    with equal weights, (B, crop, crop) float32."""
    total = None
    for m in level_maps:
        up = bilinear(m[..., None], crop)[..., 0]
        total = up if total is None else total + up
    return (total / len(level_maps)).astype(np.float32)


def smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of each (crop, crop) map, ``scipy.ndimage`` defaults (reflect,
    truncate 4.0); ``sigma=0`` returns the maps unchanged."""
    if sigma == 0:
        return maps
    out = np.empty_like(maps)
    for i, m in enumerate(maps):
        gaussian_filter(m, sigma=sigma, output=out[i])
    return out


def map_to_original(amap: np.ndarray, image_size: tuple[int, int], resize: int = 256) -> np.ndarray:
    """Place a (crop, crop) map back onto the original (H, W) image, bilinear.

    The crop covers the centre of the ``resize`` square; the border the model never saw is
    filled with the nearest map value before the square is stretched back to (H, W).
    """
    crop = amap.shape[0]
    lo = (resize - crop) // 2
    square = np.pad(amap, ((lo, resize - crop - lo),) * 2, mode="edge")
    h, w = image_size
    return cv2.resize(square, (w, h), interpolation=cv2.INTER_LINEAR)
