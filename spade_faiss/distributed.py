"""Indexing and batch scoring on Ray (extra ``ray``), with results identical to one process.

Indexing: Ray Data streams the image paths through an actor pool; each actor extracts features
with its own FeatureExtractor and appends them to its own HDF5 shard (the usual crash-safe
append). The shards are then joined into one corpus file: paths, hashes and pooled vectors are
copied (deduplicated by sha256 across shards), and ``levels/*`` become HDF5 virtual datasets
that point into the shards, so FeatureStore opens the corpus like any other. The image index is
built over the joined pooled vectors (IVF trained on a sample above the Flat threshold).

Scoring: Ray Data ``map_batches`` with an actor pool; each actor holds an open Spade (read-only)
and writes its own ``scores.<worker>.csv``/``maps.<worker>.h5``/overlays in the run directory,
the same format as ``spade-faiss score``; ``runs.read_run`` reads the union.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import h5py
import numpy as np

from .image_index import ImageIndex
from .store import SHA_DTYPE, FeatureStore

log = logging.getLogger(__name__)

SHARDS_DIR_SUFFIX = ".shards"


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Join ``address`` (an existing cluster) or start a local one."""
    import ray
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return ray


class _IndexWorker:
    """A Ray actor: one extractor, one shard file."""

    def __init__(self, shard_dir: str, params: dict, threads: int):
        import torch

        from .detector import Spade
        torch.set_num_threads(max(1, threads))  # this worker process's share of the cores
        os.makedirs(shard_dir, exist_ok=True)
        self.path = os.path.join(shard_dir, f"shard-{uuid.uuid4().hex[:12]}.h5")
        self.spade = Spade.create(self.path, **params)
        self.spade.close()  # the shard is opened per batch: Ray keeps actors alive after the run

    def __call__(self, batch: dict) -> dict:
        with self.spade.reopen("a"):
            report = self.spade.add([str(p) for p in batch["path"]])
        bad = {p: r for p, r in report.errors}
        return {"path": batch["path"], "shard": np.array([self.path] * len(batch["path"]), dtype=object),
                "error": np.array([bad.get(str(p), "") for p in batch["path"]], dtype=object)}


def index_ray(paths: list[str], out: str, params: dict, workers: int = 2, batch_size: int = 8,
              address: str | None = None, gpus_per_worker: float = 0.0) -> dict:
    """Build the corpus ``out`` from ``paths`` on Ray; returns a summary with the errors."""
    if os.path.exists(out):
        raise FileExistsError(f"{out}: already exists (the Ray engine builds new corpora; "
                              f"append with the local engine or rebuild)")
    ray = init_ray(address, None if address else workers)
    shard_dir = str(Path(out).with_suffix(SHARDS_DIR_SUFFIX))
    cpus = max(1, int(ray.cluster_resources().get("CPU", workers)) // workers)
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, len(paths) // batch_size))
    rows = ds.map_batches(_IndexWorker, fn_constructor_kwargs={"shard_dir": shard_dir, "params": params,
                                                                "threads": cpus},
                          batch_size=batch_size, concurrency=workers, num_cpus=cpus, num_gpus=gpus_per_worker,
                          batch_format="numpy").take_all()
    errors = [(r["path"], r["error"]) for r in rows if r["error"]]
    shards = sorted({r["shard"] for r in rows})
    for unused in set(map(str, Path(shard_dir).glob("shard-*.h5"))) - set(shards):
        os.remove(unused)  # an actor that got no batch (or a failed earlier run) left it empty
    summary = join_shards(shards, out, index=params.get("index", "auto"), nlist=params.get("nlist"),
                          nprobe=params.get("nprobe"))
    summary["errors"] = errors
    return summary


def join_shards(shards: list[str], out: str, index: str = "auto", nlist=None, nprobe=None) -> dict:
    """One corpus file over several shard stores: copied rows for paths/hashes/pool, virtual
    datasets for the levels (no copy of the pyramids), and a fresh image index."""
    stores = [FeatureStore.open(p) for p in shards]
    try:
        first = stores[0]
        for s in stores[1:]:
            s.check_config(first.config)
        keep, seen = [], set()  # per shard: the rows to keep (first occurrence of each sha256)
        for s in stores:
            rows = []
            for i, sha in enumerate(s.sha256s()):
                if sha not in seen:
                    seen.add(sha)
                    rows.append(i)
            keep.append(np.array(rows, dtype=np.int64))
        n = int(sum(len(k) for k in keep))
        with h5py.File(out, "w") as h:
            for key, value in first.h5.attrs.items():
                h.attrs[key] = value
            h.attrs["n_committed"] = n
            h.attrs["shards"] = [os.path.relpath(p, os.path.dirname(os.path.abspath(out))) for p in shards]
            img = h.create_group("images")
            img.create_dataset("path", data=[p for s, k in zip(stores, keep) for p in np.array(s.paths(), object)[k]],
                               dtype=h5py.string_dtype("utf-8"), maxshape=(None,))
            img.create_dataset("sha256", data=np.array([x.encode() for s, k in zip(stores, keep)
                                                        for x in np.array(s.sha256s())[k]], dtype=SHA_DTYPE),
                               maxshape=(None,))
            pool = img.create_dataset("pool", (n, first.pool_dim), np.float32, maxshape=(None, first.pool_dim),
                                      chunks=(256, first.pool_dim))
            row = 0
            for s, k in zip(stores, keep):
                if len(k):
                    pool[row:row + len(k)] = s.pool()[k]
                    row += len(k)
            levels = h.create_group("levels")
            for lv in first.config.levels:
                levels.create_virtual_dataset(lv, _virtual_layout(stores, keep, lv, out), fillvalue=0)
            h.create_group("index")
    finally:
        for s in stores:
            s.close()
    with FeatureStore.open(out, "a") as store:
        ImageIndex.build(store.pool(), index, nlist, nprobe).save(store)
    return {"store": out, "images": n, "shards": len(shards)}


def _virtual_layout(stores, keep, level: str, out: str):
    ds0 = stores[0].h5["levels"][level]
    n = int(sum(len(k) for k in keep))
    layout = h5py.VirtualLayout(shape=(n, *ds0.shape[1:]), dtype=ds0.dtype)
    base = os.path.dirname(os.path.abspath(out))
    row = 0
    for s, k in zip(stores, keep):
        ds = s.h5["levels"][level]
        # Relative source names resolve against the virtual file's folder: the corpus and its
        # shards can move together.
        src = h5py.VirtualSource(os.path.relpath(s.path, base), f"levels/{level}", shape=ds.shape)
        for a, b in _runs(k):  # one mapping per run of consecutive kept rows
            layout[row:row + b - a] = src[a:b]
            row += b - a
    return layout


def _runs(rows: np.ndarray):
    if not len(rows):
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for part in np.split(rows, breaks):
        yield int(part[0]), int(part[-1]) + 1


class _ScoreWorker:
    """A Ray actor: one open Spade, one set of result files."""

    def __init__(self, store: str, params: dict, run_dir: str, overlays: bool, threads: int):
        import torch

        from .detector import Spade
        from .runs import RunWriter
        torch.set_num_threads(max(1, threads))
        self.spade = Spade.open(store, **params)
        self.store_paths = self.spade.store_.paths()
        thresholds = self.spade.store_.thresholds() or {}
        self.tau, self.theta = thresholds.get("tau"), thresholds.get("theta")
        self.spade.close()  # opened per batch: Ray keeps actors alive after the run
        self.writer = RunWriter(run_dir, self.spade.crop, overlays=overlays, suffix=f".{uuid.uuid4().hex[:12]}")
        self.overlays = overlays

    def __call__(self, batch: dict) -> dict:
        from . import images as imglib
        from .runs import score_rows
        prepared = [imglib.prepare(str(p), self.spade.resize, self.spade.crop) for p in batch["path"]]
        with self.spade.reopen("r"):
            result = self.spade.score_prepared(prepared)
        self.writer.write(*score_rows(self.spade, prepared, result, self.tau, self.theta, self.overlays,
                                      self.store_paths))
        self.writer.write_errors(result.errors)
        bad = dict(result.errors)
        return {"path": batch["path"], "error": np.array([bad.get(str(p), "") for p in batch["path"]], dtype=object)}


def score_ray(store: str, paths: list[str], run_dir: str, params: dict, workers: int = 2, batch_size: int = 8,
              overlays: bool = True, address: str | None = None, gpus_per_worker: float = 0.0) -> dict:
    """Score ``paths`` against ``store`` on Ray into ``run_dir`` (skipping images already done)."""
    from .runs import read_run
    ray = init_ray(address, None if address else workers)
    done = {r["image_path"] for r in read_run(run_dir)}
    todo = [p for p in paths if p not in done]
    if not todo:
        return {"run": run_dir, "scored": 0, "skipped_done": len(paths), "errors": []}
    cpus = max(1, int(ray.cluster_resources().get("CPU", workers)) // workers)
    ds = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=max(1, len(todo) // batch_size))
    rows = ds.map_batches(_ScoreWorker, fn_constructor_kwargs={"store": store, "params": params, "run_dir": run_dir,
                                                                "overlays": overlays, "threads": cpus},
                          batch_size=batch_size, concurrency=workers, num_cpus=cpus, num_gpus=gpus_per_worker,
                          batch_format="numpy").take_all()
    errors = [(r["path"], r["error"]) for r in rows if r["error"]]
    return {"run": run_dir, "scored": len(todo) - len(errors), "skipped_done": len(paths) - len(todo),
            "errors": errors}
