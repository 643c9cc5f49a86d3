"""Tiles of high-resolution images as items (issue 38): with ``--tile S``, every image is cut into
S x S tiles, each an item addressed by a *tile reference* ``<image path>#tile=X,Y,W,H`` (its
top-left corner and size in the image's pixels) everywhere a path is kept, like a video frame.

Placement (:func:`origins`): along each side, tiles start every ``S - overlap`` pixels from 0,
and a last tile is placed flush with the far edge when the others leave pixels out (so every
tile is S x S and every pixel is in a tile); an image side shorter than S is one tile of that
side's length. Normal images' tiles are indexed as the corpus's items: a test tile retrieves its
``k_gallery`` nearest normal tiles, from any position, and stage 2 runs on them as for images.

A tiled image's results (:func:`stitch`, ``tiled.csv``): its **map** in its own pixels is, at each
pixel, the mean of the maps of the tiles whose crop covers that pixel (each tile's map in that
tile's pixels, ``scoring.map_to_original``); a pixel no tile's crop covers (the image's outer
margin the centre crop leaves out) is NaN. Its **score** is the largest of its tiles' image
scores (an image is as anomalous as its most anomalous tile), and the tile that gave it is named.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

_REF = re.compile(r"^(?P<image>.+)#tile=(?P<x>\d+),(?P<y>\d+),(?P<w>\d+),(?P<h>\d+)$", re.S)


@dataclasses.dataclass(frozen=True)
class TileRef:
    image: str
    x: int
    y: int
    w: int
    h: int

    @property
    def path(self) -> str:
        return f"{self.image}#tile={self.x},{self.y},{self.w},{self.h}"

    @property
    def stem(self) -> str:
        """A file-name stem for pictures of this tile: ``<image stem>_x<X>_y<Y>``."""
        return f"{os.path.splitext(os.path.basename(self.image))[0]}_x{self.x}_y{self.y}"


def parse_ref(path: str) -> TileRef | None:
    """The tile a path refers to, or None for any other path."""
    m = _REF.match(str(path))
    if m is None:
        return None
    return TileRef(m.group("image"), *(int(m.group(k)) for k in ("x", "y", "w", "h")))


def position(path: str) -> tuple[int, int, int, int] | None:
    """Where an item was cut: ``(x, y, w, h)`` of a tile reference, None for a whole image (or
    frame): what ``same_position`` retrieval matches."""
    ref = parse_ref(path)
    return None if ref is None else (ref.x, ref.y, ref.w, ref.h)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How images are cut: ``size`` (None: not at all) and the ``overlap`` of neighbours."""

    size: int | None = None
    overlap: int = 0

    def __post_init__(self):
        if self.size is not None and not 0 <= self.overlap < self.size:
            raise ValueError(f"tile_overlap={self.overlap}: expected 0 <= overlap < tile={self.size}")


def origins(length: int, size: int, overlap: int) -> list[int]:
    """Where tiles start along a side of ``length`` pixels (see the module docstring)."""
    if length <= size:
        return [0]
    step = size - overlap
    starts = list(range(0, length - size + 1, step))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding its pixels."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read its size to cut tiles ({e})") from None
    return h, w


def list_tiles(path: str, tiling: Tiling) -> list[TileRef]:
    """The tiles of image ``path``, row by row."""
    h, w = image_size(path)
    size = tiling.size
    return [TileRef(str(path), x, y, min(size, w), min(size, h))
            for y in origins(h, size, tiling.overlap) for x in origins(w, size, tiling.overlap)]


def stitch(size: tuple[int, int], tiles: list[tuple[TileRef, np.ndarray]]) -> np.ndarray:
    """The map of an image of ``size`` (H, W) from its tiles' maps, each given in its tile's
    pixels ((h, w), NaN where the tile's crop did not reach): the mean over covering tiles,
    NaN where none covers (float32)."""
    total = np.zeros(size, np.float64)
    count = np.zeros(size, np.uint16)
    for ref, m in tiles:
        seen = ~np.isnan(m)
        window = np.s_[ref.y:ref.y + ref.h, ref.x:ref.x + ref.w]
        total[window] += np.where(seen, m, 0.0)
        count[window] += seen
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (total / count).astype(np.float32)
    out[count == 0] = np.nan
    return out
