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


@pytest.mark.parametrize("kind, trailer", [("jpg", b"MotionPhoto" + bytes(range(256)) * 40),
                                           ("png", b"appended metadata" * 10)])
def test_bytes_after_the_end_of_a_valid_file_are_accepted(tmp_path, rng, kind, trailer):
    arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    good = _write(tmp_path / f"a.{kind}", arr)
    with_trailer = tmp_path / f"b.{kind}"
    with_trailer.write_bytes(open(good, "rb").read() + trailer)
    np.testing.assert_array_equal(images.load_image(with_trailer).rgb, images.load_image(good).rgb)


def test_a_jpeg_whose_thumbnail_ends_but_whose_image_is_cut_is_truncated(tmp_path, rng):
    arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = open(_write(tmp_path / "a.jpg", arr), "rb").read()
    thumb = b"\xff\xe1" + (2 + 8).to_bytes(2, "big") + b"Exif\xff\xd9\x00\x00"  # an APP1 holding an EOI
    cut = data[:2] + thumb + data[2: len(data) // 2]
    (tmp_path / "cut.jpg").write_bytes(cut)
    with pytest.raises(images.ImageError, match="truncated JPEG"):
        images.load_image(tmp_path / "cut.jpg")


def test_a_fifo_or_a_device_is_refused_at_once_and_a_huge_file_before_it_is_read(tmp_path):
    import os
    import threading

    fifo = tmp_path / "b.png"
    os.mkfifo(fifo)
    (tmp_path / "z.png").symlink_to("/dev/zero")
    outcome = {}

    def read():
        outcome["fifo"] = images.prepare(str(fifo), 72, 64).error
        outcome["zero"] = images.prepare(str(tmp_path / "z.png"), 72, 64).error

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the reader before failing
        with open(fifo, "wb"):
            pass
    assert not t.is_alive(), "reading a FIFO blocked"
    assert "not a regular file (a FIFO)" in outcome["fifo"]
    assert "not a regular file (a character device)" in outcome["zero"]
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(2048)
    with pytest.raises(images.ImageError, match="2048 bytes, more than the 1024"):
        images.read_bytes(big, max_bytes=1024)


def _damaged_scan(data: bytes) -> bytes:
    """A JPEG with bytes of its entropy-coded data overwritten (structure and length intact)."""
    damaged = bytearray(data)
    sos = data.find(b"\xff\xda")
    for k in range(20):
        damaged[sos + 200 + 37 * k] ^= 0x5A
    return bytes(damaged)


def test_a_jpeg_with_damaged_scan_data_is_refused_by_name(tmp_path, rng, capfd):
    import cv2

    arr = cv2.GaussianBlur(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8), (9, 9), 3)
    good = _write(tmp_path / "good.jpg", arr)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(_damaged_scan(open(good, "rb").read()))
    assert cv2.imdecode(np.fromfile(bad, np.uint8), cv2.IMREAD_COLOR) is not None  # OpenCV accepts it
    capfd.readouterr()
    with pytest.raises(images.ImageError, match=f"{bad}: damaged JPEG data \\(Corrupt JPEG data"):
        images.load_image(bad)
    prepared = images.prepare(str(bad), 64, 64)
    assert prepared.tensor is None and "damaged JPEG data" in prepared.error
    images.load_image(good)  # the intact file still decodes
    # A benign libjpeg warning is no reason to refuse the picture: a baseline scan header whose
    # spectral end reads 62 ("Invalid SOS parameters for sequential JPEG"; libjpeg ignores it).
    odd = bytearray(open(good, "rb").read())
    sos = odd.find(b"\xff\xda")
    assert odd[sos + 6 + 2 * odd[sos + 4]] == 63
    odd[sos + 6 + 2 * odd[sos + 4]] = 62
    (tmp_path / "odd_sos.jpg").write_bytes(bytes(odd))
    np.testing.assert_array_equal(images.load_image(tmp_path / "odd_sos.jpg").rgb, images.load_image(good).rgb)
