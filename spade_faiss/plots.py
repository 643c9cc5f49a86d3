"""Pictures for people: ROC and PRO curves (matplotlib) and a sheet of worst cases (OpenCV)."""

from __future__ import annotations

import logging

import cv2
import numpy as np

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def curve_png(path, curves: dict, xlabel: str, ylabel: str, title: str, xmax: float = 1.0) -> None:
    """One PNG with a line per ``name -> (x, y)``."""
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


def colour(amap: np.ndarray, lo: float, hi: float) -> np.ndarray:
    norm = np.clip((amap - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(amap)
    return cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]


def worst_cases_png(path, rows: list[dict], theta: float | None, size: int = 160) -> None:
    """A sheet, one row per case: image, nearest normal neighbour, map, predicted mask (with the
    ground-truth contour in green). Each row dict has ``image``, ``neighbour`` (RGB uint8),
    ``map`` (float), ``mask`` (bool or None) and ``title``."""
    if not rows:
        return
    hi = max(float(r["map"].max()) for r in rows)
    lines = []
    for r in rows:
        pred = (r["map"] > theta) if theta is not None else np.zeros(r["map"].shape, bool)
        pred_rgb = np.repeat((pred * 255).astype(np.uint8)[..., None], 3, axis=2)
        if r.get("mask") is not None:
            contours, _ = cv2.findContours(r["mask"].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(pred_rgb, contours, -1, (0, 200, 0), 1)
        tiles = [r["image"], r["neighbour"], colour(r["map"], 0.0, hi), pred_rgb]
        tiles = [cv2.resize(t, (size, size), interpolation=cv2.INTER_AREA) for t in tiles]
        line = np.concatenate(tiles, axis=1)
        band = np.full((18, line.shape[1], 3), 255, np.uint8)
        cv2.putText(band, r["title"][:90], (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        lines += [band, line]
    header = np.full((18, 4 * size, 3), 230, np.uint8)
    for i, name in enumerate(["image", "nearest normal", "anomaly map", "predicted mask (gt: green)"]):
        cv2.putText(header, name, (i * size + 4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    sheet = np.concatenate([header] + lines, axis=0)
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
