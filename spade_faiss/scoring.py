"""Image scores and pixel maps from search distances (docs/design.md §1): score, upsample, average,
smooth, and place back onto the original image. Higher = more anomalous."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter

from .config import DEFAULTS
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


TOP_FRACTION = 0.01  # map_top1: the mean of this fraction of a map's pixels, the highest


def map_score(amap: np.ndarray, how: str) -> float:
    """An image score from its (crop, crop) map: ``map_top1``, the mean (float64) of its
    ``ceil(1%)`` highest pixels, or ``map_max``, its maximum."""
    flat = np.asarray(amap, dtype=np.float32).ravel()
    if how == "map_max":
        return float(flat.max())
    if how != "map_top1":
        raise ValueError(f"map score {how!r}: expected 'map_top1' or 'map_max'")
    n = max(1, int(np.ceil(TOP_FRACTION * flat.size)))
    return float(np.partition(flat, flat.size - n)[flat.size - n:].mean(dtype=np.float64))


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


def crop_box(image_size: tuple[int, int], resize: int, crop: int) -> tuple[float, float, float, float]:
    """Where the centre crop lies in the original image: (top, bottom, left, right) in
    (fractional) pixels of the original, which is stretched to ``resize x resize`` first."""
    h, w = image_size
    lo = (resize - crop) // 2
    return lo * h / resize, (lo + crop) * h / resize, lo * w / resize, (lo + crop) * w / resize


REMAP_TILE = 16384  # output pixels per side of one cv2.remap call (it refuses 32767 and more)


def map_to_original(amap: np.ndarray, image_size: tuple[int, int], resize: int = DEFAULTS["resize"]) -> np.ndarray:
    """A (crop, crop) map in the original image's (H, W) pixels, float32.

    The crop covers the centre of the ``resize`` square the image was stretched to: the map is
    resampled (bilinear) onto that region of the original image, and every pixel outside it,
    which the model never saw, is NaN (not extrapolated).
    """
    crop = amap.shape[0]
    h, w = image_size
    top, bottom, left, right = crop_box(image_size, resize, crop)
    # Pixel centres of the original in the crop's pixel coordinates (cv2.remap, bilinear).
    ys = (np.arange(h, dtype=np.float32) + 0.5 - top) * crop / (bottom - top) - 0.5
    xs = (np.arange(w, dtype=np.float32) + 0.5 - left) * crop / (right - left) - 0.5
    src = amap.astype(np.float32)
    out = np.empty((h, w), np.float32)
    # cv2.remap takes at most REMAP_SIDE - 1 pixels per side; each output pixel depends on its own
    # coordinates only, so tiles give the same values as one call (2 x 60000 images too).
    for r0 in range(0, h, REMAP_TILE):
        for c0 in range(0, w, REMAP_TILE):
            gx, gy = np.meshgrid(xs[c0:c0 + REMAP_TILE], ys[r0:r0 + REMAP_TILE])
            out[r0:r0 + REMAP_TILE, c0:c0 + REMAP_TILE] = cv2.remap(src, gx, gy, interpolation=cv2.INTER_LINEAR,
                                                                    borderMode=cv2.BORDER_REPLICATE)
    inside = ((ys >= -0.5) & (ys <= crop - 0.5))[:, None] & ((xs >= -0.5) & (xs <= crop - 0.5))[None, :]
    out[~inside] = np.nan
    return out
