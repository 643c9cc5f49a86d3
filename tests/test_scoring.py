import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

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


def test_smooth_is_scipy_gaussian_reflect(rng):
    m = rng.random((2, 20, 20)).astype(np.float32)
    got = scoring.smooth(m, 4)
    for i in range(2):
        np.testing.assert_allclose(got[i], gaussian_filter(m[i], 4, mode="reflect", truncate=4.0), rtol=1e-6)
    assert scoring.smooth(m, 0) is m


def test_map_to_original_places_the_crop_in_the_centre():
    amap = np.zeros((4, 4), np.float32)
    amap[1:3, 1:3] = 1
    out = scoring.map_to_original(amap, (16, 32), resize=8)
    assert out.shape == (16, 32)
    assert out[8, 16] == pytest.approx(1.0) and out[0, 0] == 0.0
    const = scoring.map_to_original(np.full((4, 4), 3.0, np.float32), (10, 7), resize=6)
    np.testing.assert_allclose(const, 3.0)
