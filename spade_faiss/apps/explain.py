"""Why a pixel is anomalous: for the most anomalous and for a normal point of an image, the
query patch at each level beside its nearest normal patch (its correspondence) in the
retrieved normal images, with the level's score there. SPADE's argument made visible: a normal
patch has a close match, an anomalous one has none."""

from __future__ import annotations

import heapq
from pathlib import Path

import cv2
import numpy as np

from ..images import ImageError, crop_view, load_image
from ..results import ScoredImage
from . import pictures
from .run_writer import folder_of, picture_stem

PATCH_PX = 96
TEXT_PX = 360  # room right of the patches, so that the caption lines fit
TOP = 5  # a run with correspondences explains its most anomalous images


def regions(result: ScoredImage) -> dict[str, tuple[int, int]]:
    """The points explained, in crop pixels: the map's maximum and its minimum."""
    amap = result.map
    return {"most anomalous": np.unravel_index(int(np.argmax(amap)), amap.shape),
            "most normal": np.unravel_index(int(np.argmin(amap)), amap.shape)}


def cell_of(point: tuple[int, int], grid: tuple[int, int], crop: int) -> tuple[int, int]:
    """The cell of an (h, w) grid over the crop that holds crop pixel ``point`` = (y, x)."""
    (y, x), (h, w) = point, grid
    return min(h - 1, int(y) * h // crop), min(w - 1, int(x) * w // crop)


def nearest_images(result: ScoredImage, paths: list[str], crop: int) -> dict:
    """For each explained point, its pixel and, per level, the corpus image holding its
    nearest normal patch."""
    return {name: {"pixel": [int(y), int(x)],
                   "nearest": {level: {"image": paths[int(c[cell_of((y, x), c.shape[:2], crop)][0])]}
                               for level, c in result.correspondences.items()}}
            for name, (y, x) in regions(result).items()}


def patch(rgb_crop: np.ndarray, grid: tuple[int, int], cell: tuple[int, int], colour) -> np.ndarray:
    """Three cells by three around ``cell`` of an (h, w) grid over the crop, enlarged, the cell
    framed."""
    crop = rgb_crop.shape[0]
    sy, sx = crop / grid[0], crop / grid[1]
    y0, x0 = max(0, int((cell[0] - 1) * sy)), max(0, int((cell[1] - 1) * sx))
    y1, x1 = min(crop, int((cell[0] + 2) * sy)), min(crop, int((cell[1] + 2) * sx))
    out = cv2.resize(np.ascontiguousarray(rgb_crop[y0:y1, x0:x1]), (PATCH_PX, PATCH_PX),
                     interpolation=cv2.INTER_NEAREST)
    fy, fx = PATCH_PX / (y1 - y0), PATCH_PX / (x1 - x0)
    top_left = (int((cell[1] * sx - x0) * fx), int((cell[0] * sy - y0) * fy))
    bottom_right = (int(((cell[1] + 1) * sx - x0) * fx) - 1, int(((cell[0] + 1) * sy - y0) * fy) - 1)
    cv2.rectangle(out, top_left, bottom_right, colour, 2)
    return out


def sheet(result: ScoredImage, paths: list[str], resize: int, crop: int) -> np.ndarray:
    """The explanation of one scored image (it needs its map and correspondences)."""
    if result.correspondences is None or result.map is None:
        raise ValueError(f"{result.path}: scored without correspondences (score with correspondences=True)")
    query = crop_view(result.image.rgb, resize, crop)
    rows, crops = [], {}
    width = 2 * PATCH_PX + 6 + TEXT_PX
    for name, (y, x) in regions(result).items():
        colour = (220, 30, 30) if name == "most anomalous" else (30, 160, 30)
        rows.append(pictures.caption_band([f"{name} point: pixel ({int(y)}, {int(x)}) of the crop"], width))
        for level, corr in result.correspondences.items():
            h, w = corr.shape[:2]
            cell = cell_of((y, x), (h, w), crop)
            image_id, row, col = (int(v) for v in corr[cell])
            if image_id not in crops:
                try:
                    crops[image_id] = crop_view(load_image(paths[image_id]).rgb, resize, crop)
                except (ImageError, FileNotFoundError):
                    crops[image_id] = np.full((crop, crop, 3), 128, np.uint8)  # the source moved: grey
            tiles = np.concatenate([patch(query, (h, w), cell, colour), np.full((PATCH_PX, 6, 3), 255, np.uint8),
                                    patch(crops[image_id], (h, w), (row, col), colour)], axis=1)
            text = pictures.caption_band([f"{level} cell {cell}: score {float(result.level_scores[level][cell]):.4g}",
                                          "nearest normal patch:", Path(paths[image_id]).name,
                                          f"its cell ({row}, {col})"], TEXT_PX)
            text = np.concatenate([text, np.full((PATCH_PX - text.shape[0], TEXT_PX, 3), 255, np.uint8)])
            rows.append(np.concatenate([tiles, text], axis=1))
    marked = query.copy()
    for name, (y, x) in regions(result).items():
        cv2.circle(marked, (int(x), int(y)), max(4, crop // 40), (220, 30, 30) if "anomalous" in name
                   else (30, 160, 30), 2)
    head = cv2.resize(marked, (2 * PATCH_PX + 6, 2 * PATCH_PX + 6), interpolation=cv2.INTER_AREA)
    head = np.concatenate([head, np.full((head.shape[0], width - head.shape[1], 3), 255, np.uint8)], axis=1)
    title = pictures.caption_band([f"{Path(result.path).parent.name}/{Path(result.path).name}",
                                   f"image score {result.score:.4g}", "red: the most anomalous point",
                                   "green: the most normal point", "left: query patch, right: its nearest",
                                   "normal patch (3x3 cells, the cell framed)"], width)
    return np.concatenate([title, head] + rows, axis=0)


class TopExplained:
    """Keeps the ``TOP`` highest-scoring results that have correspondences (for a run's
    ``explain/`` folder) without keeping the others."""

    def __init__(self, n: int = TOP):
        self.n, self.heap, self.count = n, [], 0

    def offer(self, result: ScoredImage) -> None:
        if result.error is None and result.correspondences is not None:
            self.count += 1
            item = (result.score, self.count, result)
            (heapq.heappush if len(self.heap) < self.n else heapq.heappushpop)(self.heap, item)

    def write(self, folder: Path, paths: list[str], resize: int, crop: int) -> list[Path]:
        written = []
        for _, _, result in sorted(self.heap, key=lambda t: -t[0]):
            out = folder / folder_of(result.path) / (picture_stem(result.path) + ".png")
            out.parent.mkdir(parents=True, exist_ok=True)
            pictures.save_png(out, sheet(result, paths, resize, crop))
            written.append(out)
        return written
