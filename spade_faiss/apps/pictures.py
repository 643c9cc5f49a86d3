"""Every picture the applications make: the colour scale of anomaly maps, overlays with a
colour bar and a caption, map PNGs for the service, ROC/PRO curves and the worst-case sheet.

One colour scale everywhere: 0 (blue) to ``hi`` (red), where ``hi`` is twice the calibrated
pixel threshold theta (so theta sits in the middle of the scale and colours compare across
images), or, before calibration, a scale given by the caller (a corpus-wide statistic).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import cv2
import numpy as np

log = logging.getLogger(__name__)

FONT = cv2.FONT_HERSHEY_SIMPLEX
MIN_SIDE = 320
# The long side of a picture is at most this many pixels: PNG writers refuse very wide rows
# (libpng: 1,000,000), and a full-resolution overlay of a large part costs more than it shows.
MAX_SIDE = 2048
BAR_WIDTH = 56
WHITE, BLACK = (255, 255, 255), (0, 0, 0)
BOX = (0, 255, 0)  # defect regions' boxes (RGB green)


def colour_scale(spade) -> float:
    """The top of the colour scale every picture of ``spade``'s maps shares: twice the pixel
    threshold, or twice the leave-one-out one when it is not calibrated (estimated only then)."""
    return colour_scale_max(spade.theta_, lambda: 2 * spade.leave_one_out_theta())


def colour_scale_max(theta: float | None, fallback: float | Callable[[], float] | None = None) -> float:
    """The top of the colour scale: ``2 * theta`` when calibrated, else ``fallback`` (a value,
    or a function computing it, called only then)."""
    if theta is not None and theta > 0:
        return 2.0 * float(theta)
    if callable(fallback):
        fallback = fallback()
    if fallback is None or not fallback > 0:
        raise ValueError("no colour scale: calibrate the corpus, or give a positive fallback scale")
    return float(fallback)


def colourize(amap: np.ndarray, hi: float) -> np.ndarray:
    """JET colours of ``amap`` on the fixed scale [0, hi], RGB uint8 (NaN pixels black)."""
    norm = np.divide(amap, hi, dtype=np.float32)
    np.fmax(norm, 0, out=norm)  # NaN -> 0 (fmax ignores NaN)
    np.fmin(norm, 1, out=norm)
    np.multiply(norm, 255, out=norm)
    return cv2.cvtColor(cv2.applyColorMap(norm.astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def map_png(amap: np.ndarray, hi: float) -> bytes:
    """The map as a colour PNG (the service's ``map_png``)."""
    ok, png = cv2.imencode(".png", cv2.cvtColor(colourize(amap, hi), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()


def overlay(rgb: np.ndarray, amap: np.ndarray, hi: float, theta: float | None = None,
            caption: list[str] | None = None, alpha: float = 0.5, boxes: list | None = None) -> np.ndarray:
    """The image with its map as a colour layer, the contour of ``map > theta``, a colour bar
    (0 to ``hi``, theta marked) and a caption band; ``boxes``: defect regions' boxes
    ``(x0, y0, x1, y1)`` in the image's pixels (x1, y1 exclusive), drawn as rectangles.

    ``amap`` has the image's size; NaN marks pixels the model never saw (outside the centre
    crop): they keep their original colours. Small images are enlarged (whole factors, at least
    ``MIN_SIDE`` pixels on the short side) so that the caption and contours stay readable, and
    no side exceeds ``MAX_SIDE`` (large or extreme images are reduced).
    """
    h, w = rgb.shape[:2]
    factor = min(max(1, math.ceil(MIN_SIDE / min(h, w))), MAX_SIDE / max(h, w))
    if factor != 1:
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_NEAREST if factor > 1 else cv2.INTER_AREA)
        seen = cv2.resize(np.isfinite(amap).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        amap = np.where(seen, cv2.resize(np.nan_to_num(amap, nan=0.0), size, interpolation=cv2.INTER_LINEAR), np.nan)
    seen = np.isfinite(amap).view(np.uint8)
    layer = cv2.addWeighted(rgb, 1 - alpha, colourize(amap, hi), alpha, 0)
    out = np.ascontiguousarray(rgb).copy()
    cv2.copyTo(layer, seen, out)  # the colour layer where the model saw the image
    if theta is not None:
        above = (amap > theta).view(np.uint8)  # False where NaN
        contours, _ = cv2.findContours(above, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, WHITE, max(1, min(out.shape[:2]) // 200))
    for x0, y0, x1, y1 in boxes or ():
        scale_x, scale_y = out.shape[1] / w, out.shape[0] / h
        cv2.rectangle(out, (int(x0 * scale_x), int(y0 * scale_y)),
                      (max(0, math.ceil(x1 * scale_x) - 1), max(0, math.ceil(y1 * scale_y) - 1)), BOX,
                      max(1, min(out.shape[:2]) // 150))
    out = np.concatenate([out, colour_bar(out.shape[0], hi, theta)], axis=1)
    return np.concatenate([caption_band(caption or [], out.shape[1]), out], axis=0)


def colour_bar(height: int, hi: float, theta: float | None) -> np.ndarray:
    """A vertical bar of the scale, 0 at the bottom and ``hi`` at the top, with ticks."""
    bar = np.full((height, BAR_WIDTH, 3), 255, np.uint8)
    ramp = np.linspace(hi, 0, height, dtype=np.float32)[:, None].repeat(14, axis=1)
    bar[:, 4:18] = colourize(ramp, hi)
    scale = max(0.3, min(0.45, height / 600))
    for value in (hi, hi / 2 if theta is None else theta, 0.0):
        y = int(round((1 - value / hi) * (height - 1)))
        cv2.line(bar, (18, y), (24, y), BLACK, 1)
        cv2.putText(bar, f"{value:.3g}", (25, min(height - 3, max(10, y + 4))), FONT, scale, BLACK, 1, cv2.LINE_AA)
    return bar


def caption_band(lines: list[str], width: int) -> np.ndarray:
    """White band with the text of each entry; an entry too long for the width wraps at its
    double spaces (fields), and a single field still too long keeps its end (a path's name)."""
    if not lines:
        return np.zeros((0, width, 3), np.uint8)
    scale, step = 0.42, 16
    chars = max(8, int(width / (scale * 22)))
    rows = [row for text in lines for row in wrap_fields(text, chars)]
    band = np.full((6 + step * len(rows), width, 3), 255, np.uint8)
    for i, text in enumerate(rows):
        cv2.putText(band, text, (4, 4 + step * (i + 1) - 4), FONT, scale, BLACK, 1, cv2.LINE_AA)
    return band


def wrap_fields(text: str, chars: int) -> list[str]:
    """``text`` as rows of at most ``chars`` characters, breaking only between fields separated
    by two spaces; a field longer than a row is cut from the left ("...end")."""
    rows: list[str] = []
    for field in text.split("  "):
        field = field if len(field) <= chars else "..." + field[-(chars - 3):]
        if rows and len(rows[-1]) + 2 + len(field) <= chars:
            rows[-1] += "  " + field
        else:
            rows.append(field)
    return rows


def save_png(path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: could not write the picture")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def curve_png(path, curves: dict, xlabel: str, ylabel: str, title: str, xmax: float = 1.0) -> None:
    """One PNG with a line per ``label -> (x, y)`` (put the area in the label)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0, xmax), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def histogram_bins(scores) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of the image scores' histogram: between 5 and 50 equal bins, about four
    scores per bin (scores that are not finite left out)."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    return np.histogram(scores, bins=min(50, max(5, len(scores) // 4)))


def histogram_svg(scores, tau: float | None = None) -> str:
    """Histogram of image scores as an SVG document (the report's, drawn without a plotting
    library: importing matplotlib and drawing took 0.5 s of every ``score`` run), with the image
    threshold tau as a red line when there is one. One ``rect`` per bin (class ``bin``, the
    count in ``data-count``)."""
    counts, edges = histogram_bins(scores)
    w, h, left, bottom, top, right = 500, 300, 50, 45, 30, 15
    lo, hi = float(edges[0]), float(edges[-1])
    if tau is not None:
        lo, hi = min(lo, tau), max(hi, tau)
    span = hi - lo or 1.0
    x = lambda v: left + (v - lo) / span * (w - left - right)  # noqa: E731
    peak = max(1, int(counts.max()) if len(counts) else 1)
    y = lambda c: h - bottom - c / peak * (h - bottom - top)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
             'font-family="sans-serif" font-size="11">', f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="13">image scores</text>']
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        parts.append(f'<rect class="bin" data-count="{int(c)}" x="{x(a):.2f}" y="{y(c):.2f}" '
                     f'width="{max(0.5, x(b) - x(a) - 0.5):.2f}" height="{y(0) - y(c):.2f}" fill="#4477aa"/>')
    parts.append(f'<line x1="{left}" y1="{y(0)}" x2="{w - right}" y2="{y(0)}" stroke="black"/>')
    parts.append(f'<line x1="{left}" y1="{y(0)}" x2="{left}" y2="{top}" stroke="black"/>')
    for v in np.linspace(lo, hi, 5):
        parts.append(f'<text x="{x(v):.2f}" y="{y(0) + 14}" text-anchor="middle">{v:.3g}</text>')
    for c in sorted({0, peak // 2, peak}):
        parts.append(f'<text x="{left - 5}" y="{y(c) + 4:.2f}" text-anchor="end">{c}</text>')
    parts.append(f'<text x="{(left + w - right) / 2}" y="{h - 8}" text-anchor="middle">'
                 'image score (higher = more anomalous)</text>')
    parts.append(f'<text x="12" y="{(top + h - bottom) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {(top + h - bottom) / 2})">images</text>')
    if tau is not None:
        parts.append(f'<line class="tau" x1="{x(tau):.2f}" y1="{y(0)}" x2="{x(tau):.2f}" y2="{top}" '
                     'stroke="#cc3311" stroke-width="2"/>')
        parts.append(f'<text x="{x(tau) + 4:.2f}" y="{top + 10}" fill="#cc3311">tau {tau:.4g}</text>')
    return "".join(parts) + "</svg>"


def worst_cases_png(path, rows: list[dict], hi: float, theta: float | None, size: int = 160) -> None:
    """A sheet, one row per case: image, nearest normal image, map (on the scale [0, hi]),
    predicted mask (with the ground-truth contour in green). Each row dict has ``image``,
    ``neighbour`` (RGB uint8), ``map`` (float), ``mask`` (bool or None) and ``title``."""
    if not rows:
        return
    lines = []
    for r in rows:
        pred = (r["map"] > theta) if theta is not None else np.zeros(r["map"].shape, bool)
        pred_rgb = np.repeat((pred * 255).astype(np.uint8)[..., None], 3, axis=2)
        if r.get("mask") is not None:
            contours, _ = cv2.findContours(r["mask"].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(pred_rgb, contours, -1, (0, 200, 0), 1)
        tiles = [r["image"], r["neighbour"], colourize(r["map"], hi), pred_rgb]
        tiles = [cv2.resize(t, (size, size), interpolation=cv2.INTER_AREA) for t in tiles]
        line = np.concatenate(tiles, axis=1)
        lines += [caption_band([r["title"]], line.shape[1]), line]
    names = ["image", "nearest normal", f"anomaly map (0..{hi:.3g})", "predicted mask (gt: green)"]
    header = np.concatenate([caption_band([n], size) for n in names], axis=1)
    save_png(path, np.concatenate([header] + lines, axis=0))
