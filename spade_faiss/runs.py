"""Output files of a scoring run: ``scores.csv``, ``errors.csv``, ``maps.h5`` and overlays.

Appends are ordered so that a crash loses nothing that was reported: maps are written and
flushed first, the CSV row last; on resume the CSV is the record of what is done and any map
rows past it are overwritten.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import cv2
import h5py
import numpy as np

from .images import printable

SCORE_FIELDS = ["image_path", "score", "is_anomalous", "map_max", "neighbour_paths"]
ERROR_FIELDS = ["image_path", "reason"]


def shard_suffix(shard_index: int, num_shards: int) -> str:
    return "" if num_shards == 1 else f".shard-{shard_index:05d}-of-{num_shards:05d}"


def read_rows(path) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_run(run_dir) -> list[dict]:
    """All score rows of a run directory, every shard included, sorted by path."""
    rows = []
    for p in sorted(Path(run_dir).glob("scores*.csv")):
        rows += read_rows(p)
    return sorted(rows, key=lambda r: r["image_path"])


class RunWriter:
    """Appends results of one shard of a run, resumable."""

    def __init__(self, run_dir, crop: int, shard_index: int = 0, num_shards: int = 1,
                 overlays: bool = True):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        sfx = shard_suffix(shard_index, num_shards)
        self.scores_path = self.dir / f"scores{sfx}.csv"
        self.errors_path = self.dir / f"errors{sfx}.csv"
        self.done = {r["image_path"] for r in read_rows(self.scores_path)}
        self.failed = {r["image_path"] for r in read_rows(self.errors_path)}
        self.overlay_dir = self.dir / "overlays" if overlays else None
        if self.overlay_dir:
            self.overlay_dir.mkdir(exist_ok=True)
        self.maps = h5py.File(self.dir / f"maps{sfx}.h5", "a")
        if "maps" not in self.maps:
            self.maps.create_dataset("maps", (0, crop, crop), maxshape=(None, crop, crop), dtype=np.float32,
                                     chunks=(1, crop, crop))
            self.maps.create_dataset("path", (0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"))
        self.n_maps = len(self.done)  # map rows past the CSV are leftovers of a crash
        self._scores = _open_csv(self.scores_path, SCORE_FIELDS)
        self._errors = _open_csv(self.errors_path, ERROR_FIELDS)

    def write(self, rows: list[dict], maps: np.ndarray, pictures: list | None = None) -> None:
        """Append scored rows (dicts with SCORE_FIELDS), their maps (zeros where not segmented),
        and per row an overlay picture or None."""
        if len(rows):
            n = self.n_maps
            for name in ("maps", "path"):
                self.maps[name].resize(n + len(rows), axis=0)
            self.maps["maps"][n:] = maps
            self.maps["path"][n:] = [r["image_path"] for r in rows]
            self.maps.flush()
            self.n_maps += len(rows)
        for i, pic in enumerate(pictures or []):
            if pic is None:
                continue
            name = f"{len(self.done) + i:06d}_{Path(rows[i]['image_path']).stem}.png"
            cv2.imwrite(str(self.overlay_dir / name), cv2.cvtColor(pic, cv2.COLOR_RGB2BGR))
        for r in rows:
            self._scores.writerow(r)
            self.done.add(r["image_path"])
        _sync(self._scores)

    def write_errors(self, errors: list[tuple[str, str]]) -> None:
        for path, reason in errors:
            path = printable(path)
            if path not in self.failed:
                self._errors.writerow({"image_path": path, "reason": reason})
                self.failed.add(path)
        _sync(self._errors)

    def close(self):
        self.maps.close()
        self._scores.file.close()
        self._errors.file.close()


def _open_csv(path, fields):
    new = not os.path.isfile(path) or os.path.getsize(path) == 0
    f = open(path, "a", newline="", encoding="utf-8")
    w = csv.DictWriter(f, fieldnames=fields)
    w.file = f
    if new:
        w.writeheader()
    return w


def _sync(writer):
    writer.file.flush()
    os.fsync(writer.file.fileno())


def overlay(rgb: np.ndarray, amap: np.ndarray, theta: float | None = None, alpha: float = 0.5) -> np.ndarray:
    """The image with its map as a JET colour layer and the contour of ``map > theta``.

    Without a threshold the colours span the map's own range; with one, the threshold sits in
    the middle of the scale, so colours compare across images.
    """
    if theta is not None and theta > 0:
        norm = np.clip(amap / (2 * theta), 0, 1)
    else:
        lo, hi = float(amap.min()), float(amap.max())
        norm = (amap - lo) / (hi - lo) if hi > lo else np.zeros_like(amap)
    colour = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    out = cv2.addWeighted(rgb, 1 - alpha, colour, alpha, 0)
    if theta is not None:
        contours, _ = cv2.findContours((amap > theta).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
    return out
