"""Pictures: one fixed colour scale, overlays that colour only what the model saw, a colour bar,
a caption, curves and sheets written as real PNG files."""

import cv2
import numpy as np
import pytest

from spade_faiss.apps import pictures


def test_colour_scale_is_fixed_and_shared():
    assert pictures.colour_scale_max(0.5) == 1.0
    assert pictures.colour_scale_max(None, 3.0) == 3.0
    asked = []
    assert pictures.colour_scale_max(None, lambda: asked.append(1) or 3.0) == 3.0 and asked == [1]
    assert pictures.colour_scale_max(0.5, lambda: asked.append(2) or 3.0) == 1.0 and asked == [1]  # not estimated
    with pytest.raises(ValueError, match="no colour scale"):
        pictures.colour_scale_max(None)
    m = np.array([[0.0, 1.0, 2.0, 4.0]], np.float32)
    c = pictures.colourize(m, 2.0)
    assert c.shape == (1, 4, 3) and c.dtype == np.uint8
    assert tuple(c[0, 2]) == tuple(c[0, 3])           # clipped at the top of the scale
    assert c[0, 0, 2] > c[0, 0, 0] and c[0, 2, 0] > c[0, 2, 2]  # blue at 0, red at the top
    # The same value gets the same colour in any map (no per-map min-max).
    np.testing.assert_array_equal(pictures.colourize(np.array([[1.0]]), 2.0)[0, 0], c[0, 1])
    png = pictures.map_png(np.zeros((5, 7), np.float32), 1.0)
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).shape == (5, 7, 3)


def test_overlay_colours_only_the_seen_region_and_adds_bar_and_caption():
    rgb = np.full((40, 60, 3), 100, np.uint8)
    amap = np.full((40, 60), np.nan, np.float32)
    amap[10:30, 15:45] = 0.0
    amap[18:22, 28:32] = 5.0                          # above theta: a contour
    out = pictures.overlay(rgb, amap, hi=2.0, theta=1.0, caption=["crack/x.png", "score 3.2 ANOMALOUS"])
    f = 8  # 40 px is small: enlarged 8x to reach 320 px, so the caption stays readable
    band = out.shape[0] - 40 * f
    assert band > 0 and out.shape[1] == 60 * f + pictures.BAR_WIDTH
    body = out[band:, : 60 * f]
    assert np.array_equal(body[0, 0], [100, 100, 100])          # outside the crop: untouched
    assert not np.array_equal(body[12 * f, 17 * f], [100, 100, 100])   # inside: coloured
    assert (body == 255).all(axis=2).any()                       # the white contour
    assert (out[:band] < 128).any()                              # caption text drawn


def test_the_histogram_svg_draws_numpy_s_counts_and_tau(rng):
    """One bar per bin, each as high as its count against the tallest (numpy.histogram's
    counts), and tau's line where its value falls on the axis; a real XML document."""
    import xml.etree.ElementTree as ET

    scores = rng.gamma(2.0, 1.0, 203)
    svg = ET.fromstring(pictures.histogram_svg(scores, tau=3.5))
    ns = "{http://www.w3.org/2000/svg}"
    bars = [r for r in svg.iter(ns + "rect") if r.get("class") == "bin"]
    counts, edges = np.histogram(scores, bins=50)
    assert [int(b.get("data-count")) for b in bars] == counts.tolist()
    heights = np.array([float(b.get("height")) for b in bars])
    np.testing.assert_allclose(heights / heights.max(), counts / counts.max(), atol=1e-3)
    xs = np.array([float(b.get("x")) for b in bars])
    assert (np.diff(xs) > 0).all()
    (tau,) = [line for line in svg.iter(ns + "line") if line.get("class") == "tau"]
    x_of = lambda v: xs[0] + (v - edges[0]) / (edges[1] - edges[0]) * (xs[1] - xs[0])  # noqa: E731
    assert float(tau.get("x1")) == pytest.approx(x_of(3.5), abs=0.05)
    assert not [line for line in ET.fromstring(pictures.histogram_svg([1.0, 1.0, 1.0])).iter(ns + "line")
                if line.get("class") == "tau"]
    for odd in ([], [float("nan"), 2.0, float("inf")]):  # no score, or some not finite: still a picture
        bars = [r for r in ET.fromstring(pictures.histogram_svg(odd, tau=1.0)).iter(ns + "rect")
                if r.get("class") == "bin"]
        assert sum(int(b.get("data-count")) for b in bars) == sum(np.isfinite(odd))


def test_curves_and_worst_cases_are_png_files(tmp_path):
    pictures.curve_png(tmp_path / "roc.png", {"image (AUROC 0.9)": ([0, 0.5, 1], [0, 0.9, 1])}, "fpr", "tpr", "ROC")
    row = {"image": np.zeros((20, 20, 3), np.uint8), "neighbour": np.zeros((20, 20, 3), np.uint8),
           "map": np.ones((20, 20), np.float32), "mask": np.eye(20, dtype=bool), "title": "crack/x.png"}
    pictures.worst_cases_png(tmp_path / "w.png", [row, row], hi=2.0, theta=0.5, size=40)
    for name in ("roc.png", "w.png"):
        img = cv2.imread(str(tmp_path / name))
        assert img is not None and img.shape[0] > 20, name
    assert cv2.imread(str(tmp_path / "w.png")).shape[1] == 4 * 40


def test_caption_fields_wrap_instead_of_being_cut():
    """A caption line too long for a small overlay wraps between its fields: the score and the
    verdict stay readable (they used to be cut off from the left)."""
    line = "score 1.225e+04  not calibrated  map max 1.225e+04"
    assert pictures.wrap_fields(line, 24) == ["score 1.225e+04", "not calibrated", "map max 1.225e+04"]
    assert pictures.wrap_fields(line, 80) == [line]
    assert pictures.wrap_fields("defect/a_very_long_file_name.png", 16) == ["...file_name.png"]
    short, wrapped = pictures.caption_band(["x"], 200), pictures.caption_band([line], 200)
    assert wrapped.shape[0] > short.shape[0]  # more rows, not a cut row


@pytest.mark.parametrize("shape", [(1, 5000), (5000, 1), (3000, 4000)])
def test_extreme_and_large_images_get_an_overlay_within_the_writers_limits(tmp_path, shape):
    rgb = np.full((*shape, 3), 128, np.uint8)
    amap = np.linspace(0, 1, shape[0] * shape[1], dtype=np.float32).reshape(shape)
    out = pictures.overlay(rgb, amap, 1.0, 0.5, ["an extreme image", "score 1.0"])
    assert max(out.shape[:2]) <= pictures.MAX_SIDE + 200  # the caption band and colour bar on top
    pictures.save_png(tmp_path / "o.png", out)
    assert (tmp_path / "o.png").stat().st_size > 0


def test_colours_and_the_colour_layer_equal_their_plain_definition(rng):
    """Oracle: JET of trunc(255 * clip(nan_to_num(map) / hi, 0, 1)) (RGB), blended half and half
    with the image where the map is finite, the image itself elsewhere (no contour, no resize)."""
    amap = (rng.random((330, 340)) * 3 - 0.5).astype(np.float32)
    amap[rng.random(amap.shape) < 0.2] = np.nan
    amap[0, :3] = [np.inf, -np.inf, np.nan]
    rgb = rng.integers(0, 256, (330, 340, 3), dtype=np.uint8)
    for hi in (1.0, 0.37, 2.5e-3):
        with np.errstate(over="ignore"):  # nan_to_num turns inf into the largest float32
            norm = np.clip(np.nan_to_num(amap * hi, nan=0.0) / hi, 0, 1)
        expected = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
        np.testing.assert_array_equal(pictures.colourize(amap * hi, hi), expected)
    expected = cv2.addWeighted(rgb, 0.5, pictures.colourize(amap, 1.0), 0.5, 0)
    expected = np.where(np.isfinite(amap)[..., None], expected, rgb)
    out = pictures.overlay(rgb, amap, 1.0)
    np.testing.assert_array_equal(out[:, :340], expected)
