"""Preprocessing per SPEC 1.1, checked against values computed independently here."""


import cv2
import numpy as np
import pytest

from spade_faiss import images
from spade_faiss.datasets import Sample, discover


def _write(path, arr):
    assert cv2.imwrite(str(path), arr)
    return str(path)


def _expected(rgb_u8, resize=256, crop=224):
    # Independent: INTER_AREA via cv2, crop by slicing, normalise by hand.
    r = cv2.resize(rgb_u8, (resize, resize), interpolation=cv2.INTER_AREA)
    o = (resize - crop) // 2
    c = r[o:o + crop, o:o + crop].astype(np.float64) / 255
    c = (c - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    return c.transpose(2, 0, 1)


def test_colour_png_is_rgb_ordered(tmp_path, rng):
    bgr = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    img = images.load_image(_write(tmp_path / "a.png", bgr))
    assert img.size == (50, 70)
    np.testing.assert_array_equal(img.rgb, bgr[..., ::-1])
    x = images.preprocess(img.rgb)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    np.testing.assert_allclose(x, _expected(bgr[..., ::-1].copy()), atol=1e-5)


def test_grayscale_expands_to_three_equal_channels(tmp_path, rng):
    g = rng.integers(0, 256, (40, 30), dtype=np.uint8)
    img = images.load_image(_write(tmp_path / "g.png", g))
    assert img.rgb.shape == (40, 30, 3)
    for c in range(3):
        np.testing.assert_array_equal(img.rgb[..., c], g)


def test_rgba_drops_alpha(tmp_path, rng):
    bgra = rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)
    img = images.load_image(_write(tmp_path / "a.png", bgra))
    np.testing.assert_array_equal(img.rgb, bgra[..., 2::-1])


def test_16bit_is_scaled_to_8bit(tmp_path, rng):
    g16 = rng.integers(0, 65536, (16, 24), dtype=np.uint16)
    img = images.load_image(_write(tmp_path / "d.png", g16))
    np.testing.assert_array_equal(img.rgb[..., 0], (g16 >> 8).astype(np.uint8))


def test_non_square_is_stretched_then_centre_cropped(rng):
    rgb = rng.integers(0, 256, (30, 90, 3), dtype=np.uint8)
    x = images.preprocess(rgb, resize=40, crop=32)
    np.testing.assert_allclose(x, _expected(rgb, 40, 32), atol=1e-5)


def test_mask_nearest_and_threshold(tmp_path):
    m = np.zeros((100, 100), np.uint8)
    m[40:60, 10:20] = 255
    m[0:5, 0:5] = 100  # below the >127 threshold
    got = images.load_mask(_write(tmp_path / "m.png", m), (100, 100), resize=50, crop=40)
    r = cv2.resize(m, (50, 50), interpolation=cv2.INTER_NEAREST)[5:45, 5:45] > 127
    np.testing.assert_array_equal(got, r)
    assert got.sum() == 50
    with pytest.raises(images.ImageError, match="mask is 100x100, image is 90x100"):
        images.load_mask(str(tmp_path / "m.png"), (100, 90))


@pytest.mark.parametrize("kind", ["png", "jpg"])
def test_truncated_files_are_refused(tmp_path, rng, kind):
    arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    good = _write(tmp_path / f"a.{kind}", arr)
    data = open(good, "rb").read()
    bad = tmp_path / f"t.{kind}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(images.ImageError, match=f"{bad}: truncated"):
        images.load_image(bad)


def test_bad_inputs_name_the_file(tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(images.ImageError, match="x.png: not a decodable image"):
        images.load_image(tmp_path / "x.png")
    with pytest.raises(images.ImageError, match="e.png: empty file"):
        images.load_image(tmp_path / "e.png")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        images.load_image(tmp_path / "nope.png")
    p = images.prepare(Sample(str(tmp_path / "x.png")), 72, 64)
    assert p.error.startswith(str(tmp_path / "x.png")) and p.tensor is None


def test_prepared_batches_keep_order_and_errors(tmp_path, dataset):
    samples = discover(dataset)[:5] + [Sample(str(tmp_path / "missing.png"))]
    rgb = images.load_image(samples[0].path)
    inputs = iter(samples + [rgb.rgb, rgb])  # any iterable: samples, arrays, decoded images
    batches = list(images.iter_prepared(inputs, 2, 72, 64, workers=2))
    flat = [p for b in batches for p in b]
    assert [len(b) for b in batches] == [2, 2, 2, 2]
    assert [p.path for p in flat] == [s.path for s in samples] + ["<array>", samples[0].path]
    assert [p.sample for p in flat[:6]] == samples
    assert flat[5].error and "missing.png" in flat[5].error
    for p in flat[6:]:
        np.testing.assert_array_equal(p.tensor, flat[0].tensor)
