import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spade_faiss import scoring


def test_image_scores_hand_computed():
    d = np.array([[1.0, 2.0, 6.0], [0.0, 4.0, 5.0]], np.float32)
    np.testing.assert_allclose(scoring.image_scores(d, 2), [1.5, 2.0])
    np.testing.assert_allclose(scoring.image_scores(d, 3), [3.0, 3.0])
    with pytest.raises(ValueError, match="k_image=4"):
        scoring.image_scores(d, 4)


def test_assemble_maps_upsamples_bilinear_and_averages(rng):
    a = rng.random((2, 4, 4)).astype(np.float32)
    b = rng.random((2, 2, 2)).astype(np.float32)
    got = scoring.assemble_maps([a, b], 16)

    def up(m):
        return F.interpolate(torch.from_numpy(m)[:, None], size=(16, 16), mode="bilinear",
                             align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(got, (up(a) + up(b)) / 2, rtol=1e-6)


def gaussian_by_hand(m: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian, kernel radius int(4 * sigma + 0.5), 'reflect' borders (d c b a | a b c d),
    written out with numpy: the contract scipy.ndimage.gaussian_filter's defaults implement."""
    r = int(4.0 * sigma + 0.5)
    x = np.arange(-r, r + 1)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    out = m.astype(np.float64)
    for axis in (0, 1):
        padded = np.pad(out, [(r, r) if a == axis else (0, 0) for a in (0, 1)], mode="symmetric")
        out = sum(k[i] * np.take(padded, np.arange(i, i + m.shape[axis]), axis=axis) for i in range(2 * r + 1))
    return out


def test_smooth_is_a_reflect_gaussian(rng):
    m = rng.random((2, 20, 20)).astype(np.float32)
    got = scoring.smooth(m, 4)
    for i in range(2):
        np.testing.assert_allclose(got[i], gaussian_by_hand(m[i], 4), rtol=1e-5)
    impulse = np.zeros((1, 41, 41), np.float32)
    impulse[0, 20, 20] = 1
    row = scoring.smooth(impulse, 2)[0, 20]
    np.testing.assert_allclose(row / row.max(), np.exp(-0.5 * ((np.arange(41) - 20) / 2) ** 2), atol=1e-3)
    assert scoring.smooth(m, 0) is m


def test_map_to_original_places_the_crop_in_the_centre_and_nothing_outside():
    amap = np.zeros((4, 4), np.float32)
    amap[1:3, 1:3] = 1
    # resize 8, crop 4: the crop is rows/cols 2..6 of the 8x8 square = rows 4..12, cols 8..24 of 16x32
    assert scoring.crop_box((16, 32), 8, 4) == (4.0, 12.0, 8.0, 24.0)
    out = scoring.map_to_original(amap, (16, 32), resize=8)
    assert out.shape == (16, 32) and out.dtype == np.float32
    seen = np.isfinite(out)
    assert seen[4:12, 8:24].all() and seen.sum() == 8 * 16  # exactly the crop's pixels, no streaks
    assert out[8, 16] == pytest.approx(1.0) and out[4, 8] == 0.0
    # Pixel (row 6, col 12) has its centre at crop coordinates (0.75, 0.625): bilinear by hand.
    want = (1 - 0.75) * ((1 - 0.625) * 0 + 0.625 * 0) + 0.75 * ((1 - 0.625) * 0 + 0.625 * 1)
    assert out[6, 12] == pytest.approx(want)
    const = scoring.map_to_original(np.full((4, 4), 3.0, np.float32), (10, 7), resize=6)
    np.testing.assert_allclose(const[np.isfinite(const)], 3.0)


def test_map_to_original_in_tiles_equals_one_remap_and_takes_extreme_aspect_ratios(monkeypatch):
    """cv2.remap refuses 32767 pixels per side: tiles give the same values as one call, and a
    2 x 60000 image gets its map."""
    rng = np.random.default_rng(1)
    amap = rng.random((8, 8)).astype(np.float32)
    whole = scoring.map_to_original(amap, (37, 53), resize=10)
    monkeypatch.setattr(scoring, "REMAP_TILE", 7)  # many tiles, partial ones at both edges
    tiled = scoring.map_to_original(amap, (37, 53), resize=10)
    assert np.array_equal(np.isnan(whole), np.isnan(tiled)) and np.array_equal(whole[~np.isnan(whole)],
                                                                               tiled[~np.isnan(tiled)])
    monkeypatch.undo()
    thin = scoring.map_to_original(amap, (2, 60000), resize=10)
    assert thin.shape == (2, 60000) and np.isfinite(thin).any()
