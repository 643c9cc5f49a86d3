"""Bilinear resampling with align_corners=False semantics, against values computed by hand."""

import numpy as np

from spade_faiss.resample import bilinear, concat_levels


def test_upsampling_2x_hand_computed():
    # 2x2 -> 4x4, align_corners=False: output pixel i samples input coordinate (i + 0.5) / 2 - 0.5,
    # clamped to [0, 1]: -0.25 -> 0, 0.25, 0.75, 1.25 -> 1.
    m = np.array([[0.0, 4.0], [8.0, 12.0]], np.float32)[None, :, :, None]
    got = bilinear(m, 4)[0, :, :, 0]
    w = np.array([0.0, 0.25, 0.75, 1.0])          # weight of the second input row/column
    want = np.array([[(1 - a) * ((1 - b) * 0 + b * 4) + a * ((1 - b) * 8 + b * 12) for b in w] for a in w])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0, 0] == 0 and got[3, 3] == 12 and got[1, 1] == 3.0


def test_identity_size_and_channels_last():
    m = np.random.default_rng(0).random((2, 3, 3, 5)).astype(np.float32)
    assert np.array_equal(bilinear(m, 3), m)
    up = bilinear(m, 6)
    assert up.shape == (2, 6, 6, 5)
    np.testing.assert_allclose(up[1, :, :, 4], bilinear(m[1:2, :, :, 4:5], 6)[0, :, :, 0])


def test_concat_levels_upsamples_to_the_first_grid():
    a = np.zeros((1, 4, 4, 2), np.float32)
    b = np.full((1, 2, 2, 3), 7.0, np.float32)
    got = concat_levels([a, b])
    assert got.shape == (1, 4, 4, 5) and np.all(got[..., :2] == 0) and np.all(got[..., 2:] == 7)
