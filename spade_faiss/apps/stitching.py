"""A tiled run's images (``--tile``; ``tiles.py`` documents the rules): each image's map stitched
from its tiles' maps in ``maps.h5``, its score (the largest tile score) and the tile that gave it
in ``tiled.csv``, and an overlay of the stitched map on the whole image in ``stitched/``.

Maps are stitched one image at a time (its tiles' rows read from ``maps.h5``), so memory holds
one image and its map, whatever the number of images."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import h5py
import numpy as np

from .. import tiles
from ..images import load_image
from ..scoring import map_to_original
from . import pictures
from .run_writer import picture_stem, write_csv_whole

TILED_FIELDS = ["image_path", "tiles", "score", "tile", "map_max", "is_anomalous", "overlay"]
STITCHED = "stitched"


def tiled_images(rows: list[dict]) -> dict[str, list[dict]]:
    """Score rows of tiles by their image, in the order the images first appear."""
    out: dict[str, list[dict]] = collections.OrderedDict()
    for r in rows:
        ref = tiles.parse_ref(r["image_path"])
        if ref is not None:
            out.setdefault(ref.image, []).append(r)
    return out


def stitched_map(maps_h5: Path, image: str, tile_paths: list[str], resize: int) -> np.ndarray:
    """The map of ``image`` in its own pixels from its tiles' rows of ``maps_h5`` (the blend of
    ``tiles.stitch``)."""
    with h5py.File(maps_h5, "r") as h:
        return _stitched(h, _rows_by_path(h), image, tile_paths, resize)


def _rows_by_path(h: h5py.File) -> dict[str, int]:
    """Row of each path in an open ``maps.h5`` (the last row of a path counts)."""
    return {p.decode() if isinstance(p, bytes) else p: i for i, p in enumerate(h["path"][()])}


def _stitched(h: h5py.File, rows: dict[str, int], image: str, tile_paths: list[str], resize: int) -> np.ndarray:
    parts = []
    for p in tile_paths:
        ref = tiles.parse_ref(p)
        parts.append((ref, map_to_original(h["maps"][rows[p]], (ref.h, ref.w), resize)))
    return tiles.stitch(tiles.image_size(image), parts)


def write_tiled(run, resize: int, tau: float | None, colour_max: float | None, theta: float | None) -> int:
    """``tiled.csv`` (written whole, then renamed) and, with ``colour_max``, the stitched overlays
    of every tiled image of ``run``; returns the number of tiled images (0: none, no file)."""
    groups = tiled_images(run.score_rows())
    if not groups:
        return 0
    maps_h5 = run.maps_h5()
    h = h5py.File(maps_h5, "r") if maps_h5.is_file() else None
    try:
        out = [_image_row(run, h, _rows_by_path(h) if h else {}, image, rows, resize, tau, colour_max, theta)
               for image, rows in groups.items()]  # maps.h5's paths read once for every image
    finally:
        if h is not None:
            h.close()
    write_csv_whole(run.tiled_csv, TILED_FIELDS, out)
    return len(out)


def _image_row(run, h, map_rows: dict, image: str, rows: list[dict], resize: int, tau, colour_max, theta) -> dict:
    """One tiled image's row of ``tiled.csv`` (and its stitched overlay, with ``colour_max``)."""
    best = max(rows, key=lambda r: float(r["score"]))
    score = float(best["score"])
    with_map = [r["image_path"] for r in rows if r.get("map_max")]  # tiles stage 2 ran on (--maps auto: some)
    amap = _stitched(h, map_rows, image, with_map, resize) if with_map and h is not None else None
    mapped = amap is not None and not np.isnan(amap).all()
    overlay = ""
    if mapped and colour_max is not None:
        overlay = f"{STITCHED}/{picture_stem(image)}.png"
        verdict = "" if tau is None else ("ANOMALOUS" if score > tau else "normal")
        caption = [os.path.basename(image), f"score {score:.4g} (the largest of {len(rows)} tiles)  {verdict}"]
        path = run.path / overlay
        path.parent.mkdir(parents=True, exist_ok=True)
        pictures.save_png(path, pictures.overlay(load_image(image).rgb, amap, colour_max, theta, caption))
    return {"image_path": image, "tiles": len(rows), "score": f"{score:.6g}", "tile": best["image_path"],
            "map_max": f"{np.nanmax(amap):.6g}" if mapped else "",
            "is_anomalous": "" if tau is None else int(score > tau), "overlay": overlay}
