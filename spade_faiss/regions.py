"""Defect regions: where a map says the defect is, as data (docs/design.md, "Defect regions").

A region is a connected component (8-connectivity) of the pixels whose map value exceeds a
threshold (the calibrated pixel threshold ``theta`` unless one is given), on the map at the
input image's own resolution (``scoring.map_to_original``; pixels outside the centre crop the
model saw are NaN and never part of a region). Each region has its box in image pixels
(``x0, y0`` inclusive, ``x1, y1`` exclusive), its area in pixels, and the peak and mean map
value over its pixels. Regions are listed by decreasing area (ties: by position).
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
from scipy import ndimage

FIELDS = ("x0", "y0", "x1", "y1", "area", "peak", "mean")


@dataclasses.dataclass(frozen=True)
class Region:
    x0: int
    y0: int
    x1: int
    y1: int
    area: int
    peak: float
    mean: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def find_regions(amap: np.ndarray, threshold: float) -> list[Region]:
    """The connected components of ``amap > threshold`` (NaN is never above), largest first."""
    if not np.isfinite(threshold):
        raise ValueError(f"region threshold {threshold!r}: expected a finite number")
    above = np.greater(amap, threshold, where=np.isfinite(amap), out=np.zeros(amap.shape, bool))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(above.view(np.uint8), connectivity=8,
                                                            ltype=cv2.CV_32S)
    if n <= 1:
        return []
    index = np.arange(1, n)
    values = np.where(above, amap, 0.0).astype(np.float64)
    peaks = ndimage.maximum(values, labels, index)
    sums = ndimage.sum_labels(values, labels, index)
    out = []
    for k in index:
        x, y, w, h, area = (int(v) for v in stats[k])
        out.append(Region(x, y, x + w, y + h, area, float(peaks[k - 1]), float(sums[k - 1] / area)))
    return sorted(out, key=lambda r: (-r.area, r.y0, r.x0))
