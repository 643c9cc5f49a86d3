"""Defect regions equal an independent flood fill (8-connectivity) of ``map > threshold``."""

from collections import deque

import numpy as np
import pytest
from scipy import ndimage

from spade_faiss.regions import find_regions


def flood_fill_regions(amap: np.ndarray, threshold: float) -> list[tuple]:
    """The oracle: breadth-first search over the 8 neighbours, in plain Python."""
    h, w = amap.shape
    above = [[bool(np.isfinite(amap[y, x]) and amap[y, x] > threshold) for x in range(w)] for y in range(h)]
    seen = [[False] * w for _ in range(h)]
    out = []
    for y in range(h):
        for x in range(w):
            if not above[y][x] or seen[y][x]:
                continue
            pixels, queue = [], deque([(y, x)])
            seen[y][x] = True
            while queue:
                cy, cx = queue.popleft()
                pixels.append((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and above[ny][nx] and not seen[ny][nx]:
                            seen[ny][nx] = True
                            queue.append((ny, nx))
            ys, xs = [p[0] for p in pixels], [p[1] for p in pixels]
            vals = [float(amap[p]) for p in pixels]
            out.append((min(xs), min(ys), max(xs) + 1, max(ys) + 1, len(pixels), max(vals), sum(vals) / len(vals)))
    return sorted(out, key=lambda r: (-r[4], r[1], r[0]))


@pytest.mark.parametrize("seed", range(6))
def test_regions_equal_a_flood_fill(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 40, 2)
    amap = rng.gamma(2.0, 1.0, (h, w)).astype(np.float32)
    amap[rng.random((h, w)) < 0.05] = np.nan  # outside the crop
    threshold = float(np.nanquantile(amap, rng.uniform(0.5, 0.95))) if np.isfinite(amap).any() else 1.0
    got = [(r.x0, r.y0, r.x1, r.y1, r.area, r.peak, r.mean) for r in find_regions(amap, threshold)]
    want = flood_fill_regions(amap, threshold)
    assert [g[:5] for g in got] == [x[:5] for x in want]
    np.testing.assert_allclose([g[5:] for g in got], [x[5:] for x in want], rtol=1e-6)
    assert len(got) > 0 or not (amap > threshold).any()
    labels, n = ndimage.label(np.nan_to_num(amap, nan=-np.inf) > threshold, structure=np.ones((3, 3)))
    areas = sorted((int((labels == i).sum()) for i in range(1, n + 1)), reverse=True)
    assert [g[4] for g in got] == areas  # the named oracle too: scipy's labelling, 8-connected


def test_diagonal_pixels_are_one_region_and_nothing_above_is_none():
    amap = np.eye(5, dtype=np.float32) * 3
    (r,) = find_regions(amap, 1.0)
    assert (r.x0, r.y0, r.x1, r.y1, r.area, r.peak, r.mean) == (0, 0, 5, 5, 5, 3.0, 3.0)
    assert find_regions(amap, 3.0) == []  # strictly above
    with pytest.raises(ValueError, match="finite"):
        find_regions(amap, float("nan"))
