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
    """Appends results of one shard (or worker) of a run, resumable.

    No file stays open between writes: several processes (shards, Ray workers) can write
    into one run directory, and any of them can be killed without leaving a handle behind.
    """

    def __init__(self, run_dir, crop: int, shard_index: int = 0, num_shards: int = 1,
                 overlays: bool = True, suffix: str | None = None):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        sfx = self.suffix = shard_suffix(shard_index, num_shards) if suffix is None else suffix
        self.scores_path = self.dir / f"scores{sfx}.csv"
        self.errors_path = self.dir / f"errors{sfx}.csv"
        self.maps_path = self.dir / f"maps{sfx}.h5"
        self.crop = crop
        # Resume knows everything done in this run directory, by any shard or worker.
        self.done = {r["image_path"] for r in read_run(self.dir)}
        self.failed = {r["image_path"] for r in read_rows(self.errors_path)}
        self.overlay_dir = self.dir / "overlays" if overlays else None
        if self.overlay_dir:
            self.overlay_dir.mkdir(exist_ok=True)
        self.n_maps = len(read_rows(self.scores_path))  # map rows past the CSV: leftovers of a crash

    def write(self, rows: list[dict], maps: np.ndarray, pictures: list | None = None) -> None:
        """Append scored rows (dicts with SCORE_FIELDS), their maps (zeros where not segmented),
        and per row an overlay picture or None."""
        n = self.n_maps
        if len(rows):
            with h5py.File(self.maps_path, "a") as h:
                if "maps" not in h:
                    c = self.crop
                    h.create_dataset("maps", (0, c, c), maxshape=(None, c, c), dtype=np.float32, chunks=(1, c, c))
                    h.create_dataset("path", (0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"))
                for name in ("maps", "path"):
                    h[name].resize(n + len(rows), axis=0)
                h["maps"][n:] = maps
                h["path"][n:] = [r["image_path"] for r in rows]
            self.n_maps += len(rows)
        for i, pic in enumerate(pictures or []):
            if pic is None:
                continue
            name = f"{n + i:06d}{self.suffix}_{Path(rows[i]['image_path']).stem}.png"
            cv2.imwrite(str(self.overlay_dir / name), cv2.cvtColor(pic, cv2.COLOR_RGB2BGR))
        _append_csv(self.scores_path, SCORE_FIELDS, rows)
        self.done.update(r["image_path"] for r in rows)

    def write_errors(self, errors: list[tuple[str, str]]) -> None:
        fresh = []
        for path, reason in errors:
            path = printable(path)
            if path not in self.failed:
                fresh.append({"image_path": path, "reason": reason})
                self.failed.add(path)
        _append_csv(self.errors_path, ERROR_FIELDS, fresh)


def _append_csv(path, fields, rows) -> None:
    """Append rows (a header first in a new file) and fsync: a row on disk is a done image."""
    new = not os.path.isfile(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def score_rows(spade, prepared: list, result, tau: float | None, theta: float | None, overlays: bool,
               store_paths: list[str]):
    """What a run writes for one scored batch: CSV rows, maps (zeros where not segmented) and
    per row an overlay picture (or None)."""
    from .scoring import map_to_original

    ok = [p for p in prepared if p.error is None]
    rows, pictures = [], []
    for i, path in enumerate(result.paths):
        amap = result.maps[i] if result.segmented[i] else None
        score = float(result.image_scores[i])
        rows.append({"image_path": path, "score": f"{score:.6g}",
                     "is_anomalous": "" if tau is None else int(score > tau),
                     "map_max": "" if amap is None else f"{amap.max():.6g}",
                     "neighbour_paths": ";".join(store_paths[j] for j in result.neighbour_ids[i][: spade.k_image])})
        rgb = ok[i].image.rgb
        pictures.append(overlay(rgb, map_to_original(amap, rgb.shape[:2], spade.resize), theta)
                        if overlays and amap is not None else None)
    maps = result.maps if result.maps is not None else np.zeros((len(rows), spade.crop, spade.crop), np.float32)
    return rows, maps, pictures


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
