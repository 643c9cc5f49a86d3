"""A run directory: every path and file of a scoring run, and scoring samples into one.

``run.json`` (the manifest: how the run was made, and each invocation), ``scores*.csv``,
``errors*.csv``, ``maps*.h5`` (one of each per shard), ``overlays/``, ``explain/``, and for an
evaluation ``metrics.json``, ``table.md`` and the plots; ``report.html`` is made from them.
Nothing else in the package names these files. A run directory holds one run: resuming with
another corpus or other parameters is refused (``restart`` clears it instead).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from ..clock import utc_now
from ..results import ScoredImage
from ..temporal import smooth_frames
from ..version import __version__
from ..video import parse_ref
from .run_writer import RunWriter, read_rows, shard_suffix, write_csv_whole

# What must be equal for two invocations to write into one run directory.
FRAME_FIELDS = ["video", "frame", "time_s", "image_path", "score", "smoothed_score", "is_anomalous"]
MANIFEST_KEYS = ("corpus", "corpus_created", "corpus_images", "corpus_generation", "weights_sha256", "scoring", "maps",
                 "tau", "theta")
SINCE_0_3_2 = ("corpus_generation",)  # a run made before has none: not compared when resumed


class RunDir:
    """The files of one run directory, by name (the directory need not exist yet)."""

    MANIFEST = "run.json"
    REPORT = "report.html"
    METRICS = "metrics.json"
    TABLE = "table.md"
    OVERLAYS = "overlays"
    EXPLAIN = "explain"
    PLOTS = ("roc", "pro", "worst_cases")  # <name>.png, written by an evaluation

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # Paths.
    def scores_csv(self, suffix: str = "") -> Path:
        return self.path / f"scores{suffix}.csv"

    def errors_csv(self, suffix: str = "") -> Path:
        return self.path / f"errors{suffix}.csv"

    def maps_h5(self, suffix: str = "") -> Path:
        return self.path / f"maps{suffix}.h5"

    frames_csv = property(lambda self: self.path / "frames.csv")
    tiled_csv = property(lambda self: self.path / "tiled.csv")
    stitched = property(lambda self: self.path / "stitched")

    def regions_csv(self, suffix: str = "") -> Path:
        return self.path / f"regions{suffix}.csv"

    def plot(self, name: str) -> Path:
        return self.path / f"{name}.png"

    manifest_path = property(lambda self: self.path / self.MANIFEST)
    report = property(lambda self: self.path / self.REPORT)
    metrics = property(lambda self: self.path / self.METRICS)
    table = property(lambda self: self.path / self.TABLE)
    overlays = property(lambda self: self.path / self.OVERLAYS)
    explain = property(lambda self: self.path / self.EXPLAIN)

    # Reading.
    def score_rows(self) -> list[dict]:
        """Every scored input's row, all shards, sorted by path; an input scored again after its
        content changed counts by its last row."""
        last = {r["image_path"]: r for p in sorted(self.path.glob("scores*.csv")) for r in read_rows(p)}
        return sorted(last.values(), key=lambda r: r["image_path"])

    def region_rows(self) -> list[dict]:
        """Every defect region, all shards, by image path then region number."""
        rows = [r for p in sorted(self.path.glob("regions*.csv")) for r in read_rows(p)]
        return sorted(rows, key=lambda r: (r["image_path"], int(r["region"])))

    def error_rows(self) -> list[dict]:
        """Every skipped input, all shards (inputs scored since, after a repair, left out)."""
        scored = {r["image_path"] for r in self.score_rows()}
        return [r for p in sorted(self.path.glob("errors*.csv")) for r in read_rows(p) if r["image_path"] not in scored]

    def manifest(self) -> dict | None:
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.is_file() else None

    def metrics_record(self) -> dict | None:
        return json.loads(self.metrics.read_text()) if self.metrics.is_file() else None

    def explain_sheets(self) -> list[Path]:
        return sorted(self.explain.rglob("*.png")) if self.explain.is_dir() else []

    # Writing.
    def open(self, manifest: dict, restart: bool = False) -> RunDir:
        """Make the directory hold the run described by ``manifest``: new, resumed (same
        manifest keys), or refused with the way out; ``restart`` deletes an earlier run's
        results first."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--out {self.path}: is a file; expected a run directory")
        if restart and self.path.is_dir():
            self.clear()
        old = self.manifest()
        if old is None and self.score_rows():
            raise ValueError(f"{self.path} holds results of a run without {self.MANIFEST} (an older version): "
                             f"choose another --out, or pass --restart to replace them")
        if old is not None:
            diff = [k for k in MANIFEST_KEYS if (k in old or k not in SINCE_0_3_2) and old.get(k) != manifest.get(k)]
            if diff:
                shown = "; ".join(f"{k}: {old.get(k)!r} -> {manifest.get(k)!r}" for k in diff)
                raise ValueError(f"{self.path} holds a run made differently ({shown}): choose another --out, "
                                 f"or pass --restart to replace it")
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_manifest({**manifest, "spade_faiss": __version__})
        return self

    def clear(self) -> None:
        """Delete every result of the run (the directory and any foreign file stay)."""
        for pattern in ("scores*.csv", "errors*.csv", "regions*.csv", "frames.csv", "tiled.csv", "maps*.h5"):
            for p in self.path.glob(pattern):
                p.unlink()
        for p in [self.manifest_path, self.report, self.metrics, self.table] + [self.plot(n) for n in self.PLOTS]:
            p.unlink(missing_ok=True)
        for folder in (self.overlays, self.explain, self.stitched):
            shutil.rmtree(folder, ignore_errors=True)

    def write_frames(self, sigma: float, tau: float | None) -> int:
        """``frames.csv``: every scored video frame of the run (all shards), by video and frame
        order, with its score, its score smoothed along the video (``temporal.py``) and the
        decision on the smoothed one (``smoothed > tau``, when there is a tau); written whole
        and renamed. Returns the number of frames (0: no video frame, no file)."""
        rows = self.score_rows()
        smoothed = smooth_frames([r["image_path"] for r in rows], [float(r["score"]) for r in rows], sigma)
        if not smoothed:
            return 0
        out = []
        for r in rows:
            ref = parse_ref(r["image_path"])
            if ref is not None:
                s = smoothed[r["image_path"]]
                out.append({"video": ref.video, "frame": ref.frame, "time_s": "" if ref.time_s is None else ref.time_s,
                            "image_path": r["image_path"], "score": r["score"], "smoothed_score": f"{s:.6g}",
                            "is_anomalous": "" if tau is None else int(s > tau)})
        out.sort(key=lambda r: (r["video"], r["frame"]))
        write_csv_whole(self.frames_csv, FRAME_FIELDS, out)
        return len(out)

    def record_invocation(self, entry: dict) -> None:
        """Append ``entry`` (what one invocation did) to the manifest's ``runs`` list."""
        manifest = self.manifest()
        if manifest is not None:
            manifest.setdefault("runs", []).append(entry)
            self._write_manifest(manifest)

    def writer(self, crop: int, resize: int, shard_index: int = 0, num_shards: int = 1,
               colour_max: float | None = None, theta: float | None = None, all_maps: bool = True) -> RunWriter:
        return RunWriter(self, crop, resize, shard_index, num_shards, colour_max, theta, all_maps)

    def _write_manifest(self, manifest: dict) -> None:
        tmp = self.path / (self.MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, self.manifest_path)


def run_manifest(spade, corpus, source, maps: str) -> dict:
    """The manifest of a run scoring ``source`` against the opened ``spade`` (``corpus``: its
    file), with ``maps`` the CLI's spelling of the maps choice. ``corpus_generation``: the
    corpus file's generation and the segments read beside it (``Spade.open(corpus,
    generation=segments)`` after ``rollback --generation`` reproduces that state)."""
    info = spade.info()
    return {"corpus": os.path.abspath(corpus), "corpus_created": info["created"], "corpus_images": info["images"],
            "corpus_generation": [info["generations"][-1]["generation"], info["segments"]],
            "weights_sha256": info["config"]["weights_sha256"], "weights": info["weights_source"],
            "scoring": info["scoring"], "maps": maps, "tau": spade.tau_, "theta": spade.theta_,
            "source": os.path.abspath(source), "started": utc_now(),
            "command": " ".join(["spade-faiss"] + sys.argv[1:])}


# Results scored and not yet written, at most (one batch of the default batch size): what the
# scoring loop may run ahead of the run's files.
WRITE_BEHIND = 8


def score_into_run(results: Iterable[ScoredImage], writer: RunWriter, *observers: Callable[[ScoredImage], None],
                   on_progress: Callable[[int], None] | None = None,
                   check_stop: Callable[[], None] | None = None) -> list[tuple[str, str]]:
    """Write each result into the run as it arrives (local or Ray: any iterable of results),
    show it to each observer, and return the (path, reason) of those that failed.

    Writing (maps, overlays, regions, rows: ~30 ms per 900x900 image, mostly PNG encoding,
    which lets the interpreter go) runs in a thread of its own while the next results are
    scored, at most ``WRITE_BEHIND`` results behind; rows are committed in input order, and the
    observers and ``on_progress`` see each result after its row. ``check_stop()`` runs after
    each result handed over (it raises to stop: ``apps/stopping.py``; signals reach the main
    thread, never a write half done). However the loop ends, every result handed over is
    committed before this returns or raises; a write's error is raised here, and nothing is
    written after it."""
    errors: list[tuple[str, str]] = []
    handed: queue.Queue = queue.Queue(WRITE_BEHIND)
    failed: list[BaseException] = []

    def commit() -> None:
        while (r := handed.get()) is not None:
            if failed:  # a write failed: the rest is dropped (scored again on resume)
                continue
            try:
                writer.write([r])
                for observe in observers:
                    observe(r)
                if r.error:
                    errors.append((r.path, r.error))
                if on_progress is not None:
                    on_progress(1)
            except BaseException as e:  # noqa: BLE001 - raised in the scoring thread
                failed.append(e)

    thread = threading.Thread(target=commit, name="run-writer", daemon=True)
    thread.start()
    try:
        for r in results:
            if failed:
                break
            handed.put(r)
            if check_stop is not None:
                check_stop()
    finally:
        handed.put(None)
        thread.join()
    if failed:
        raise failed[0]
    return errors


__all__ = ["MANIFEST_KEYS", "RunDir", "RunWriter", "read_rows", "run_manifest", "score_into_run",
           "shard_suffix"]
