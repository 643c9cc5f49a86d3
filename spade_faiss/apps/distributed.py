"""Indexing and batch scoring on Ray (extra ``ray``), with results identical to one process.

Indexing: Ray Data streams the image paths through an actor pool; each actor owns a Spade on
its own shard file (the usual crash-safe appends). The shards are then joined into one corpus
(``store.join_shards``: levels as HDF5 virtual datasets, no copy) and its image index is built.

Scoring: a pool of actors, each holding an opened Spade, scores batches handed out in order;
the driver receives the results in input order and writes them into one run directory, the
same files as the local engine.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import numpy as np

from ..config import DEFAULTS
from ..detector import Spade, join

log = logging.getLogger(__name__)

SHARDS_DIR_SUFFIX = ".shards"


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Join ``address`` (an existing cluster) or start a local one; a missing extra is a
    one-line error that names it."""
    try:
        import ray
    except ImportError:
        raise ImportError("--backend ray needs the 'ray' extra: pip install 'spade_faiss[ray]'") from None
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return ray


def _cpus_per_worker(ray, workers: int) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", workers)) // workers)


RAY_WORKERS = 2  # the CLI's --ray-workers default


class _IndexWorker:
    """A Ray actor: one extractor, one shard file (opened per batch: Ray keeps actors alive
    after the run, and an open writer would lock the shard)."""

    def __init__(self, shard_dir: str, params: dict, threads: int, template: str | None):
        import torch
        torch.set_num_threads(max(1, threads))  # this worker process's share of the cores
        os.makedirs(shard_dir, exist_ok=True)
        self.path = os.path.join(shard_dir, f"shard-{uuid.uuid4().hex[:12]}.h5")
        self.spade = Spade.create(self.path, like=template, **params)
        self.spade.close()

    def __call__(self, batch: dict) -> dict:
        with self.spade.reopen("a"):
            report = self.spade.add([str(p) for p in batch["path"]])
        bad = dict(report.errors)
        return {"path": batch["path"], "shard": np.array([self.path] * len(batch["path"]), dtype=object),
                "error": np.array([bad.get(str(p), "") for p in batch["path"]], dtype=object)}


def _fitted_template(paths: list[str], shard_dir: str, params: dict) -> str:
    """An empty corpus whose stored representations are fitted on the first images, shared by
    every shard (pca fitted per shard could not be joined)."""
    os.makedirs(shard_dir, exist_ok=True)
    path = os.path.join(shard_dir, "template.h5")
    if os.path.exists(path):
        os.remove(path)  # a failed earlier run's
    with Spade.create(path, **params) as spade:
        spade.fit_storage(paths)
    return path


def index_ray(paths: list[str], out: str, params: dict, ray_workers: int = RAY_WORKERS,
              batch_size: int = DEFAULTS["batch_size"],
              address: str | None = None, gpus_per_worker: float = 0.0) -> dict:
    """Build the corpus ``out`` from ``paths`` on Ray; returns a summary with the errors."""
    if os.path.exists(out):
        raise FileExistsError(f"{out}: already exists (the Ray engine builds new corpora; append with "
                              f"--backend local, or choose a new name)")
    config = Spade(**params).validate_params().config_  # before the cluster starts
    ray = init_ray(address, None if address else ray_workers)
    shard_dir = str(Path(out).with_suffix(SHARDS_DIR_SUFFIX))
    template = _fitted_template(paths, shard_dir, params) if config.storage_is_fitted else None
    cpus = _cpus_per_worker(ray, ray_workers)
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, len(paths) // batch_size))
    rows = ds.map_batches(_IndexWorker, fn_constructor_kwargs={"shard_dir": shard_dir, "params": params,
                                                                "threads": cpus, "template": template},
                          batch_size=batch_size, concurrency=ray_workers, num_cpus=cpus, num_gpus=gpus_per_worker,
                          batch_format="numpy").take_all()
    if template is not None:
        os.remove(template)  # every shard holds its fit now
    errors = [(r["path"], r["error"]) for r in rows if r["error"]]
    shards = sorted({r["shard"] for r in rows})
    for unused in set(map(str, Path(shard_dir).glob("shard-*.h5"))) - set(shards):
        os.remove(unused)  # an actor that got no batch (or a failed earlier run) left it empty
    n = join(shards, out)
    keys = ("index", "nlist", "nprobe", "encoding", "target_recall", "seed")
    with Spade.open(out, mode="a", **{k: params[k] for k in keys if k in params}) as spade:
        spade.reindex()
    return {"store": out, "images": n, "shards": len(shards), "errors": errors}


class _ScoreWorker:
    """A Ray actor holding one opened Spade (read-only) for its whole life."""

    def __init__(self, store: str, params: dict, maps, threads: int, correspondences: bool):
        import torch
        torch.set_num_threads(max(1, threads))
        self.spade = Spade.open(store, **params).load_backbone()
        self.maps, self.correspondences = maps, correspondences

    def score(self, samples: list) -> list:
        return list(self.spade.iter_score(samples, maps=self.maps, correspondences=self.correspondences))


def score_ray(store: str, samples: list, params: dict, maps=True, ray_workers: int = RAY_WORKERS,
              batch_size: int = DEFAULTS["batch_size"],
              address: str | None = None, gpus_per_worker: float = 0.0, correspondences: bool = False):
    """Score ``samples`` against ``store`` on Ray; yields :class:`~spade_faiss.ScoredImage`
    results in input order (the caller writes them, as for the local engine)."""
    if not samples:
        return
    ray = init_ray(address, None if address else ray_workers)
    from ray.util import ActorPool
    cpus = _cpus_per_worker(ray, ray_workers)
    actor = ray.remote(num_cpus=cpus, num_gpus=gpus_per_worker)(_ScoreWorker)
    actors = [actor.remote(store, params, maps, cpus, correspondences) for _ in range(ray_workers)]
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    try:
        for results in ActorPool(actors).map(lambda a, b: a.score.remote(b), batches):
            yield from results
    finally:
        for a in actors:
            ray.kill(a)
