"""QueryPipeline: the two stages of SPADE over one attached corpus, in the order data flows:
backbone features -> stage 1 (image index, image scores) -> galleries (cache) -> stage 2 (patch
search per level) -> maps (upsampled, averaged, smoothed)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import metrics, patch_search, scoring, tiles
from ..backbone import query_compute
from ..galleries import GalleryCache, load_entries
from ..image_index import ImageIndex
from ..images import Prepared
from ..memory import FLOOR_BYTES, MemoryBudget, release_freed_memory
from ..resample import concat_levels
from ..results import Retrieved
from ..spill import Spill
from ..store import FeatureStore, StoreError

log = logging.getLogger(__name__)

PROJECTION_IMAGES = 16
PROJECTION_VECTORS = 16384
READ_GROUP = 4  # gallery images read per call of the store while the ones before are prepared (QueryPipeline._load)


def spread_rows(n: int, count: int) -> np.ndarray:
    """Up to ``count`` store rows of ``n``, evenly spaced from the first to the last (int64)."""
    return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))


def _located(nearest: np.ndarray, image_ids: np.ndarray, width: int) -> np.ndarray:
    """(h, w, 2) gallery (index, flat position) -> (h, w, 3) int32 (image id, row, col)."""
    row, col = np.divmod(nearest[..., 1], width)
    return np.stack([image_ids[nearest[..., 0]], row, col], axis=-1).astype(np.int32)


class QueryPipeline:
    """Owns what queries share: the gallery cache and the per-stage timings.

    Parameters
    ----------
    store : FeatureStore
    index : ImageIndex
    extractor : callable
        Returns the (lazily built) FeatureExtractor.
    budget : MemoryBudget
        Bounds the gallery cache (``cache_bytes``, and the process's memory budget).
    seed : int
        Seed of the sample the pruned engine's projections are fitted on (any sample is exact).
    spill_bytes : int
        Disk for the entries the cache evicts (``spill.py``; 0: none).
    """

    def __init__(self, store: FeatureStore, index: ImageIndex | None, extractor: Callable, budget: MemoryBudget,
                 seed: int, spill_bytes: int = 0):
        self.store, self.index, self.extractor, self.seed = store, index, extractor, seed
        self.budget = budget
        self.cache = GalleryCache(self._load, budget.cache_bytes, Spill(spill_bytes) if spill_bytes > 0 else None)
        self.timings = Counter()
        self.stats: dict[str, patch_search.SearchStats] = {}
        self.projections: dict[str, patch_search.Projection] = {}
        self._by_position: tuple[int, dict] | None = None  # (corpus size, ids by position)

    def pruning_stats(self) -> dict:
        return {name: {"pairs": s.pairs, "exact": s.exact, "pruned": round(s.pruned, 6)}
                for name, s in self.stats.items() if s.pairs}

    @contextlib.contextmanager
    def timed(self, stage: str):
        t = time.perf_counter()
        yield
        self.timings[stage] += time.perf_counter() - t

    def retrieve(self, prepared: list[Prepared], k_image: int, k_gallery: int, config) -> list[Retrieved]:
        """Backbone and stage 1 for prepared (decodable) inputs."""
        with self.timed("backbone"):
            extractor = self.extractor()
            feats = extractor(np.stack([p.tensor for p in prepared]),
                              compute=query_compute(config.search, extractor.device))
        with self.timed("stage1"):
            dist, ids = self._stage1(feats["pool"], [p.path for p in prepared], k_gallery, config)
            scores = scoring.image_scores(dist, k_image)
        return [Retrieved(p, {lv: feats[lv][i] for lv in config.levels}, float(scores[i]), ids[i], dist[i])
                for i, p in enumerate(prepared)]

    def _stage1(self, pool: np.ndarray, paths: list[str], k_gallery: int, config):
        """The ``k_gallery`` nearest corpus images of each query: from the whole corpus, or with
        ``same_position`` from the corpus items cut at the query's own position and size (a tile
        among the tiles at its place, a whole image among the whole images)."""
        if not config.same_position:
            return self.index.search(pool, k_gallery, config.nprobe)
        dist = np.empty((len(paths), k_gallery), np.float32)
        ids = np.empty((len(paths), k_gallery), np.int64)
        at = [tiles.position(p) for p in paths]
        for key in dict.fromkeys(at):
            rows = [i for i, a in enumerate(at) if a == key]
            within = self._positions().get(key, np.empty(0, np.int64))
            if len(within) < k_gallery:
                where = "whole images" if key is None else "tiles at x={}, y={}, {}x{}".format(*key)
                raise ValueError(f"same_position: the corpus has {len(within)} {where}, k_gallery={k_gallery} "
                                 f"needs at least {k_gallery}: index more normals or lower --k-gallery")
            dist[rows], ids[rows] = self.index.search(pool[rows], k_gallery, config.nprobe, within=within)
        return dist, ids

    def _positions(self) -> dict:
        """Corpus ids by position (:func:`tiles.position` of their paths), read again when the
        corpus has grown."""
        n = len(self.store)
        if self._by_position is None or self._by_position[0] != n:
            groups: dict = {}
            for i, path in enumerate(self.store.paths()):
                groups.setdefault(tiles.position(path), []).append(i)
            self._by_position = (n, {k: np.array(v, np.int64) for k, v in groups.items()})
        return self._by_position[1]

    def leave_one_out_theta(self, n_images: int, fpr: float, config, options, device: str) -> float:
        """A pixel threshold at ``fpr`` without held-out images: up to ``n_images`` corpus images
        (evenly spaced rows) are segmented from their stored features against the rest of the
        corpus (each one's own row left out of its neighbours). Their galleries go through a
        cache of their own that keeps none (``FLOOR_BYTES``): spread rows share few neighbours
        (8 rows of the user's 685-image corpus: 351 distinct of 408), and the run's cache,
        filled with them, took ``index`` to 3.7 GB at 685 normals (sixteenth wave)."""
        alive = np.setdiff1d(np.arange(len(self.store)), self.index.excluded)  # removed images left out
        n = len(alive)
        if n < 2:
            raise ValueError("leave-one-out needs a corpus of at least 2 images")
        rows = alive[spread_rows(n, n_images)]
        k_gallery = min(config.k_gallery, n - 1)
        dist, ids = self.index.search(self.store.pool()[rows], k_gallery + 1, config.nprobe)
        read = dict(zip(*self._sound_entries([("per_level", int(r)) for r in rows])))  # damaged ones left out
        retrieved = []
        for j, row in enumerate(rows):
            if ("per_level", int(row)) not in read:
                continue
            keep = ids[j] != row
            feats = {lv: f.astype(np.float32) for lv, f in read[("per_level", int(row))].items()}
            retrieved.append(Retrieved(Prepared(None, ""), feats, 0.0,
                                       ids[j][keep][:k_gallery], dist[j][keep][:k_gallery], encoded=True))
        cache = GalleryCache(self._load, FLOOR_BYTES)
        for r in retrieved:  # one at a time, freed memory handed back after each (an index run peaks here)
            self._segment([r], config, options, device, correspondences=False, cache=cache)
            release_freed_memory()
        sound = [r for r in retrieved if r.error is None]
        damaged = next((r.error for r in retrieved if r.error), None)
        if not sound:
            raise StoreError(damaged)
        if damaged:  # one damaged normal image must not stop every score run: the estimate goes without it
            log.warning("the leave-one-out pixel threshold leaves out %d of %d corpus images: %s",
                        len(retrieved) - len(sound), len(retrieved), damaged)
        return metrics.threshold_at_fpr(np.stack([r.map for r in sound]), fpr)

    def segment(self, retrieved: list[Retrieved], config, options, device: str, correspondences: bool = False):
        """Stage 2: set ``map`` of each query (and its ``correspondences``: per level, int32
        (h, w, 3) = nearest image id, row, col); queries that retrieved the same images share one
        search over that gallery."""
        if not retrieved:
            return
        self.budget.start(self.cache)
        self._segment(retrieved, config, options, device, correspondences)
        self.budget.settle(self.cache)

    def _segment(self, retrieved: list[Retrieved], config, options, device: str, correspondences: bool,
                 cache: GalleryCache | None = None):
        cache = self.cache if cache is None else cache
        groups: dict[tuple, list[Retrieved]] = {}
        for r in retrieved:
            groups.setdefault(tuple(sorted(r.neighbour_ids.tolist())), []).append(r)
        settings = patch_search.SearchSettings(device, options.chunk_bytes, options.gpu_float16, config.window or 0)
        for key, members in groups.items():
            self._segment_group(key, members, cache, settings, config, options, device, correspondences)

    def _segment_group(self, key: tuple, members: list[Retrieved], cache: GalleryCache, settings, config, options,
                       device: str, correspondences: bool) -> None:
        """Stage 2 of the queries that retrieved the images ``key``, one search over their gallery
        (a function of its own: the gallery is let go before the next group's is read)."""
        mode, levels = config.pixel_mode, config.levels
        engines = self._engines(mode, len(key), options.stage2, device, config, correspondences)
        variant = (tuple(sorted(engines.items())), settings.keep_float16)  # what a prepared image depends on
        with self.timed("gallery_io"):
            try:
                galleries = cache.get([(mode, variant, i) for i in key])
            except StoreError as e:  # a damaged gallery image: these queries fail, the others go on
                for m in members:
                    m.error = str(e)
                return
        encoded = [self._search_space(m, mode, levels) for m in members]
        query = {name: np.stack([e[name] for e in encoded]) for name in encoded[0]}
        per_level, nearest = [], {}
        for name, q in query.items():
            with self.timed("stage2"), self.timed(f"stage2.{name}"):
                request = patch_search.LevelSearch(q, [g[name] for g in galleries], config.kappa,
                                                   self.projections.get(name),
                                                   self.stats.setdefault(name, patch_search.SearchStats()))
                dist, nearest[name] = patch_search.search_level(engines[name], request, settings)
            per_level.append(dist)
        del galleries, request
        with self.timed("post"):
            maps = scoring.smooth(scoring.assemble_maps(per_level, config.crop), config.sigma)
        for j, (m, amap) in enumerate(zip(members, maps)):
            m.map = amap
            if correspondences:
                m.correspondences = {name: _located(n[j], np.array(key), query[name].shape[2])
                                     for name, n in nearest.items()}
                m.level_scores = {name: d[j] for name, d in zip(query, per_level)}

    def _search_space(self, r: Retrieved, mode: str, levels: tuple) -> dict:
        """One query's features in the stored representations' search space (per level, or
        ``concat``: upsampled in feature space, then encoded level by level; see
        ``representations.py``). Stored rows used as queries are there already."""
        reps = self.store.representations
        feats = {lv: r.features[lv] for lv in levels}
        if mode != "concat":
            return feats if r.encoded else {lv: reps[lv].query(f) for lv, f in feats.items()}
        up = concat_levels([feats[lv][None] for lv in levels])[0]
        if r.encoded:
            return {"concat": up}
        ends = np.cumsum([self.store.feature_shapes[lv][2] for lv in levels])[:-1]
        parts = np.split(up, ends, axis=-1)
        return {"concat": np.concatenate([reps[lv].query(part) for lv, part in zip(levels, parts)], axis=-1)}

    def _engines(self, mode: str, k_gallery: int, stage2: str, device: str, config,
                 correspondences: bool) -> dict[str, str]:
        """The engine of each searched level (or ``concat``) for this configuration."""
        shapes = self.store.level_shapes
        if mode == "concat":
            h, w, _ = shapes[config.levels[0]]
            named = {"concat": (h, w, sum(s[2] for s in shapes.values()))}
        else:
            named = shapes
        return {name: patch_search.level_engine(stage2, device, shape, k_gallery, config.window,
                                                correspondences) for name, shape in named.items()}

    def _load(self, keys: list) -> list[dict]:
        """Gallery entries of ``(pixel_mode, (engines, keep_float16), image id)`` keys.

        Reading (decompression and digests, one core: HDF5 holds the interpreter) and preparing
        (the pruned engine's float64 projection, torch, which lets it go) overlap: groups of
        ``READ_GROUP`` images are read here while a worker thread prepares those read before
        (a gallery miss cost ~22 ms, 12 reading and 10 preparing, on the user's run). Should the
        projection's rounding depend on the thread that computes it, no result moves: the bounds
        account for whatever rounding they are given (``patch_search/pruned.py``) and the exact
        distances use the stored rows."""
        mode, (engines, keep16), _ = keys[0]
        engines = dict(engines)
        for name, engine in engines.items():
            if patch_search.needs_projection(engine):
                self._projection(name, mode)

        def prepare(entry: dict) -> dict:
            return {name: patch_search.prepare(engines[name], f, self.projections.get(name), keep16)
                    for name, f in entry.items()}

        ids = [(m, i) for m, _, i in keys]
        # torch's thread count is left alone here: torch.set_num_threads(1) in the worker was 7%
        # faster on gallery reads, but it sets the count every thread started later takes (the
        # service's request threads then ran the backbone on one thread: other bits than the library's)
        with ThreadPoolExecutor(1, thread_name_prefix="prepare") as worker:
            pending = []
            for s in range(0, len(ids), READ_GROUP):
                raw = load_entries(self.store.level, ids[s:s + READ_GROUP], self.store.config.levels)
                pending += [worker.submit(prepare, r) for r in raw]
            return [p.result() for p in pending]

    def _sound_entries(self, keys: list) -> list[dict]:
        """(keys read, ``load_entries`` of them), leaving out (with a warning) images whose stored
        rows are damaged: a sample of the corpus does without them; only all of them damaged is an
        error."""
        levels = self.store.config.levels
        try:
            return keys, load_entries(self.store.level, keys, levels)
        except StoreError:
            kept, out = [], []
            for key in keys:
                try:
                    out += load_entries(self.store.level, [key], levels)
                    kept.append(key)
                except StoreError as e:
                    log.warning("a corpus sample leaves out image %d: %s", key[1], e)
            if not out:
                raise
            return kept, out

    def _projection(self, name: str, mode: str) -> None:
        """The principal directions of a level (or of concat features), fitted once on a
        seeded sample of the corpus: up to 16 images (evenly spaced rows), 16384 vectors.
        Kept in the corpus file by a process that may write it (``store/names.py``), and
        read from there by later ones: any basis gives the same exact results (a good one
        prunes more), so one fitted on fewer images stays valid as the corpus grows."""
        if name in self.projections:
            return
        shapes = self.store.level_shapes
        h, w, _ = shapes[self.store.config.levels[0]] if name == "concat" else shapes[name]
        channels = sum(s[2] for s in shapes.values()) if name == "concat" else shapes[name][2]
        dims = min(patch_search.projection_dims(h * w), channels)
        # concat features (1792 channels, costlier re-checks) keep the full width: not measured narrower
        operand = None if name == "concat" else patch_search.pruned.operand_dtype()
        used = patch_search.projection_dims(h * w, operand)
        stored = self.store.records.projection(name)
        if stored is not None and stored[1].shape == (channels, dims):
            self.projections[name] = patch_search.Projection(*stored).leading(used)
            return
        n = len(self.store)
        rows = spread_rows(n, PROJECTION_IMAGES)
        _, feats = self._sound_entries([(mode, int(i)) for i in rows])
        sample = np.concatenate([f[name].reshape(-1, f[name].shape[-1]) for f in feats]).astype(np.float32)
        if len(sample) > PROJECTION_VECTORS:
            sample = sample[np.random.default_rng(self.seed).choice(len(sample), PROJECTION_VECTORS, replace=False)]
        projection = patch_search.Projection.fit(sample, dims)
        self.projections[name] = projection.leading(used)
        if self.store.writable:
            self.store.records.write_projection(name, projection.mean, projection.basis)
