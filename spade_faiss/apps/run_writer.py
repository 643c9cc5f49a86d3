"""Appending results to a run directory, resumably.

Appends are ordered so that a crash loses nothing that was reported: maps are written and
flushed first, the CSV row last; on resume the CSV is the record of what is done and any map
rows past it are overwritten. No file stays open between writes.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import h5py
import numpy as np

from .. import tiles
from ..images import content_sha256, printable
from ..regions import FIELDS, find_regions
from ..results import ScoredImage
from ..scoring import map_to_original
from ..video import parse_ref
from . import pictures

SCORE_FIELDS = ["image_path", "score", "is_anomalous", "map_max", "knn_score", "map_score", "regions",
                "largest_region", "folder", "overlay", "neighbour_paths", "sha256"]
REGION_FIELDS = ["image_path", "region", *FIELDS]
ERROR_FIELDS = ["image_path", "reason"]


def shard_suffix(shard_index: int, num_shards: int) -> str:
    return "" if num_shards == 1 else f".shard-{shard_index:05d}-of-{num_shards:05d}"


def read_rows(path) -> list[dict]:
    """The rows of one CSV file of a run (none when it does not exist)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


class RunWriter:
    """Appends results of one shard (or the only one) of a run, resumable (made by
    ``RunDir.writer``).

    No file stays open between writes, so any writer can be killed without leaving a handle
    behind. Overlays are written when ``colour_max`` (the top of their colour scale) is given;
    ``theta`` is the pixel threshold drawn as a contour (None: no contour). ``all_maps``:
    ``maps.h5`` has a row per scored image (zeros where there is no map); False (a live stream,
    ``watch``): rows only for images with a map, found by their ``path``.
    """

    def __init__(self, run, crop: int, resize: int, shard_index: int = 0, num_shards: int = 1,
                 colour_max: float | None = None, theta: float | None = None, all_maps: bool = True):
        self.run = run  # a runs.RunDir: the paths are its
        self.dir = self.run.path
        self.dir.mkdir(parents=True, exist_ok=True)
        sfx = self.suffix = shard_suffix(shard_index, num_shards)
        self.scores_path, self.errors_path, self.maps_path = (self.run.scores_csv(sfx), self.run.errors_csv(sfx),
                                                              self.run.maps_h5(sfx))
        self.regions_path = self.run.regions_csv(sfx)
        self.crop, self.resize = crop, resize
        self.colour_max, self.theta = colour_max, theta
        # Resume knows everything done in this run directory, by any shard.
        done = self.run.score_rows()
        self.done = {r["image_path"]: r.get("sha256") or "" for r in done}  # path -> content hash scored
        self.changed: set[str] = set()  # done inputs whose content changed since: scored again
        self.failed = {r["image_path"] for r in read_rows(self.errors_path)}
        self.overlay_dir = self.run.overlays if colour_max is not None else None
        self.overlays_taken = {r["overlay"]: r["image_path"] for r in done if r.get("overlay")}
        self.all_maps = all_maps
        self.n_maps = len(read_rows(self.scores_path)) if all_maps else self._committed_map_rows()
        self._drop_leftover_maps()
        self._drop_leftover_regions()

    def _committed_map_rows(self) -> int:
        """Map rows of images with a score row (``all_maps`` False): those before the first
        row a crash left."""
        if not self.maps_path.is_file():
            return 0
        with h5py.File(self.maps_path, "r") as h:
            paths = [p.decode() if isinstance(p, bytes) else p for p in h["path"][()]] if "path" in h else []
        return next((i for i, p in enumerate(paths) if p not in self.done), len(paths))

    def _drop_leftover_maps(self) -> None:
        """Map rows past the CSV are a crash's leftovers: cut them now, so that the run's files
        agree row for row from the moment it resumes (the next rows would overwrite them anyway)."""
        if not self.maps_path.is_file():
            return
        with h5py.File(self.maps_path, "a") as h:
            for ds in [h[n] for n in ("maps", "path") if n in h] + \
                    [d for g in ("correspondences", "level_scores") if g in h for d in h[g].values()]:
                if ds.shape[0] > self.n_maps:
                    ds.resize(self.n_maps, axis=0)

    def _drop_leftover_regions(self) -> None:
        """Region rows of images without a score row are a crash's leftovers (written before
        it): cut them, so that a resumed image's regions are listed once."""
        self._rewrite_regions(lambda row: row["image_path"] in self.done)

    def _rewrite_regions(self, keep) -> None:
        """Rewrite regions.csv with the rows ``keep(row)`` accepts (whole, then renamed)."""
        rows = read_rows(self.regions_path)
        kept = [r for r in rows if keep(r)]
        if len(kept) != len(rows):
            tmp = self.regions_path.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            _append_csv(tmp, REGION_FIELDS, kept) if kept else tmp.write_text(",".join(REGION_FIELDS) + "\n")
            os.replace(tmp, self.regions_path)

    def is_done(self, path: str) -> bool:
        """Scored already: a row in scores.csv whose content hash is the input's now (a file
        changed since is scored again, and its new row is the one that counts; one that cannot be
        read now keeps its row; rows written by a version that recorded no hash are taken by
        path). Inputs that failed before are tried again: a repaired file is scored, one still
        broken is reported once."""
        recorded = self.done.get(path)
        if recorded is None:
            return False
        if not recorded:
            return True
        try:
            same = content_sha256(path) == recorded
        except (ValueError, OSError):  # gone or unreadable now: its row stands (nothing else to score)
            same = True
        if not same:
            self.changed.add(path)
        return same

    def write(self, results: list[ScoredImage]) -> None:
        """Append results: errors to ``errors.csv``; the others' maps (zeros where there is no
        map), overlays and CSV rows, in that order."""
        self._write_errors([(r.path, r.error) for r in results if r.error])
        ok = [r for r in results if r.error is None]
        if not ok:
            return
        originals = {id(r): map_to_original(r.map, r.image.size, self.resize) for r in ok
                     if r.map is not None and r.image is not None and (self.theta is not None or
                                                                      self.overlay_dir is not None)}
        found = {id(r): find_regions(originals[id(r)], self.theta) for r in ok
                 if self.theta is not None and id(r) in originals}
        rows = [score_row(r, self._overlay_name(r), found.get(id(r))) for r in ok]
        self._write_maps(ok if self.all_maps else [r for r in ok if r.map is not None])
        for r, row in zip(ok, rows):
            if row["overlay"]:
                self._write_overlay(r, originals[id(r)], found.get(id(r), []), self.dir / row["overlay"])
        rescored = self.changed & {r.path for r in ok}
        if rescored:  # the regions of a changed input's earlier content go
            self._rewrite_regions(lambda row: row["image_path"] not in rescored)
            self.changed -= rescored
        _append_csv(self.regions_path, REGION_FIELDS,
                    [{"image_path": r.path, "region": k, **g.as_dict()} for r in ok for k, g in
                     enumerate(found.get(id(r), []))])
        _append_csv(self.scores_path, SCORE_FIELDS, rows)
        self.done.update((r.path, r.image.sha256 if r.image is not None else "") for r in ok)

    def _write_maps(self, results: list[ScoredImage]) -> None:
        """Rows of ``maps.h5`` for ``results`` (zeros where one has no map)."""
        if not results:
            return
        maps = np.stack([r.map if r.map is not None else np.zeros((self.crop, self.crop), np.float32)
                         for r in results])
        with h5py.File(self.maps_path, "a") as h:
            if "maps" not in h:
                c = self.crop
                h.create_dataset("maps", (0, c, c), maxshape=(None, c, c), dtype=np.float32, chunks=(1, c, c))
                h.create_dataset("path", (0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"))
            for name in ("maps", "path"):
                h[name].resize(self.n_maps + len(results), axis=0)
            h["maps"][self.n_maps:] = maps
            h["path"][self.n_maps:] = [r.path for r in results]
            _write_correspondences(h, self.n_maps, results)
        self.n_maps += len(results)

    def _overlay_name(self, r: ScoredImage) -> str:
        """``overlays/<folder>/<stem>.png`` relative to the run (the folder is the class in an
        MVTec test set); a second image with the same name gets a hash of its path appended."""
        if self.overlay_dir is None or r.map is None:
            return ""
        name = f"{self.run.OVERLAYS}/{folder_of(r.path) or '_'}/{picture_stem(r.path)}"
        if self.overlays_taken.get(name + ".png", r.path) != r.path:
            name += "-" + hashlib.sha1(r.path.encode()).hexdigest()[:8]
        self.overlays_taken[name + ".png"] = r.path
        return name + ".png"

    def _write_overlay(self, r: ScoredImage, amap: np.ndarray, regions: list, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        verdict = {None: "not calibrated", True: "ANOMALOUS", False: "normal"}[r.is_anomalous]
        caption = [f"{folder_of(r.path)}/{Path(r.path).name}",
                   f"score {r.score:.4g}  {verdict}  map max {r.map_max:.4g}" +
                   (f"  regions {len(regions)}" if self.theta is not None else "")]
        boxes = [(g.x0, g.y0, g.x1, g.y1) for g in regions]
        pictures.save_png(path, pictures.overlay(r.image.rgb, amap, self.colour_max, self.theta, caption, boxes=boxes))

    def _write_errors(self, errors: list[tuple[str, str]]) -> None:
        fresh = []
        for path, reason in errors:
            path = printable(path)
            if path not in self.failed:
                fresh.append({"image_path": path, "reason": reason})
                self.failed.add(path)
        _append_csv(self.errors_path, ERROR_FIELDS, fresh)


def _write_correspondences(h: h5py.File, start: int, results: list[ScoredImage]) -> None:
    """``correspondences/<level>`` (N, h, w, 3) int32 (image id, row, col; -1 where an image has
    no map) and ``level_scores/<level>`` (N, h, w) float32 (NaN there), rows as ``maps``."""
    example = next((r for r in results if r.correspondences), None)
    if example is None and "correspondences" not in h:
        return
    stop = start + len(results)
    for level, value in (example.correspondences if example else {}).items():
        for group, shape, dtype, fill in (("correspondences", value.shape, np.int32, -1),
                                          ("level_scores", value.shape[:2], np.float32, np.nan)):
            if f"{group}/{level}" not in h:
                h.create_dataset(f"{group}/{level}", (0, *shape), maxshape=(None, *shape), dtype=dtype,
                                 chunks=(1, *shape), fillvalue=fill)
    for group in ("correspondences", "level_scores"):
        for level, ds in h[group].items() if group in h else ():
            ds.resize(stop, axis=0)
            for i, r in enumerate(results):
                source = r.correspondences if group == "correspondences" else r.level_scores
                if source is not None:
                    ds[start + i] = source[level]


def folder_of(path: str) -> str:
    """The input's parent folder name: the class of an MVTec test image (a video's, for a frame;
    the image's, for a tile)."""
    tile = tiles.parse_ref(path)
    if tile is not None:
        return Path(tile.image).parent.name
    ref = parse_ref(path)
    return Path(ref.video if ref else path).parent.name


def picture_stem(path: str) -> str:
    """The file-name stem of an input's pictures (``<video stem>_f<index>`` for a frame,
    ``<image stem>_x<X>_y<Y>`` for a tile)."""
    ref = tiles.parse_ref(path) or parse_ref(path)
    return ref.stem if ref else Path(path).stem


def score_row(r: ScoredImage, overlay: str = "", regions: list | None = None) -> dict:
    """``regions``: the image's defect regions (None: none found, no map or no threshold)."""
    return {"image_path": r.path, "score": f"{r.score:.6g}",
            "is_anomalous": "" if r.is_anomalous is None else int(r.is_anomalous),
            "map_max": "" if r.map is None else f"{r.map_max:.6g}",
            "knn_score": "" if r.knn_score is None else f"{r.knn_score:.6g}",
            "map_score": "" if r.map_score is None else f"{r.map_score:.6g}",
            "regions": "" if regions is None else len(regions),
            "largest_region": "" if regions is None else max((g.area for g in regions), default=0),
            "folder": folder_of(r.path), "overlay": overlay, "neighbour_paths": ";".join(r.neighbour_paths),
            "sha256": r.image.sha256 if r.image is not None else ""}


def write_csv_whole(path: Path, fields, rows) -> None:
    """A CSV file written whole under a temporary name, then renamed: readers see the old file
    or the new one."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _append_csv(path, fields, rows) -> None:
    """Append rows (a header first in a new file) and fsync: a row on disk is a done image."""
    if not rows:
        return
    new = not os.path.isfile(path) or os.path.getsize(path) == 0
    if not new:  # a run resumed from an older version keeps its columns (new ones left out)
        with open(path, newline="", encoding="utf-8") as f:
            fields = next(csv.reader(f), None) or fields
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
