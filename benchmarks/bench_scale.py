"""Large corpora with the real default grid (Wide-ResNet50-2 at 224: 56/28/14 x 256/512/1024), on
this machine's disk: build time, bytes per image, stage 1 (the index ``auto`` builds: IVF above
50,000 images), stage 2, gallery bytes read per query and end-to-end seconds per image with a
cold and a warm page cache, peak RSS. JSON lines, and a plot.

How the corpus is made (fast enough to run: no backbone per corpus image): ``--bases`` real
magnetic_tile normals go through the real pipeline (random-init backbone), the corpus's stored
representation is fitted on them, and every corpus image is one base's stored pyramid under a
random flip, a random circular shift (the same shift in image pixels at every level) and noise
(+-1 step on pca codes, 1% of the value on floats), its pooled vector the base's plus noise
(5% of its norm). So a query's retrieved images are near-copies of a few bases, as on a
production line where normal parts look alike; the stage-2 work per query is that of real
features (the same values, shifted), the byte counts and I/O pattern are exact.

    .venv/bin/python benchmarks/bench_scale.py --sizes 10000 100000 --storage compact --out DIR
    .venv/bin/python benchmarks/bench_scale.py --sizes 10000 --storage float16 --out DIR

Cold: the corpus file is evicted from the page cache (``posix_fadvise(DONTNEED)``) and a fresh
``Spade`` (empty gallery cache) scores the queries; warm: another fresh ``Spade`` scores them
again with the file's pages still cached. Corpora are deleted after use unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from common import emit, machine, peak_rss_mb, real_images

from spade_faiss.detector import Spade
from spade_faiss.store import FeatureStore

WRITE_ROWS = 64


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bases(out: Path, storage: str, n_bases: int) -> Path:
    """A small real corpus: ``n_bases`` magnetic_tile normals in ``storage`` (fitted on them)."""
    path = out / f"bases_{storage.replace(',', '_').replace('=', '-')}_{n_bases}.h5"
    if not path.exists():
        with Spade.create(path, storage=storage, weights=None, device="cpu") as spade:
            spade.add(real_images("train", n_bases))
    return path


def build(path: Path, base_path: Path, n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    with FeatureStore.open(base_path) as base:
        levels = base.config.levels
        stored = {lv: base.stored_level(lv, range(len(base))) for lv in levels}
        pool = base.pool()
        reps = base.representations
        store = FeatureStore.create(path, base.config, base.feature_shapes, base.pool_dim,
                                    weights_source=base.weights_source())
        store.adopt_representations(base)
    grid = {lv: stored[lv].shape[1] for lv in levels}
    top = max(grid.values())
    with store:
        for start in range(0, n, WRITE_ROWS):
            b = min(WRITE_ROWS, n - start)
            which = rng.integers(0, len(pool), b)
            flips = rng.integers(0, 4, b)
            shifts = rng.integers(0, top, (b, 2))
            feats = {}
            for lv in levels:
                x = stored[lv][which]
                scale = top // grid[lv]
                for j in range(b):
                    xj = x[j]
                    if flips[j] & 1:
                        xj = xj[::-1]
                    if flips[j] & 2:
                        xj = xj[:, ::-1]
                    x[j] = np.roll(xj, tuple(shifts[j] // scale), axis=(0, 1))
                if reps[lv].is_pca:
                    x = np.clip(x.astype(np.int16) + rng.integers(-1, 2, x.shape, dtype=np.int16), -127, 127)
                    x = x.astype(np.int8)
                else:
                    x = (x * (1 + 0.01 * rng.standard_normal(x.shape, dtype=np.float32))).astype(x.dtype)
                feats[lv] = x
            p = pool[which]
            feats["pool"] = p + 0.05 * np.linalg.norm(p, axis=1, keepdims=True) / np.sqrt(p.shape[1]) * \
                rng.standard_normal(p.shape, dtype=np.float32)
            names = [f"synthetic/{start + j:07d}" for j in range(b)]
            shas = [f"{start + j:064x}" for j in range(b)]
            store.append(names, shas, feats, encoded=True)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    with Spade.open(path, "a", weights=None, device="cpu") as spade:
        index = spade.reindex()
    return {"build_s": round(build_s, 1), "images_per_s": round(n / build_s, 1),
            "index_s": round(time.perf_counter() - t, 1), "index": {k: index.get(k) for k in
                                                                   ("factory", "nlist", "nprobe", "tuning_recall")}}


def score(path: Path, queries: list[str], extractor, cold: bool, k_gallery: int) -> dict:
    if cold:
        evict(path)
    with Spade.open(path, k_gallery=k_gallery, device="cpu", batch_size=1) as spade:  # timed image by image
        spade.extractor_ = extractor
        t0 = None
        for i, _ in enumerate(spade.iter_score(queries, maps=True)):
            if i == 0:  # the first query also fits the pruned engine's projections: left out
                t0 = time.perf_counter()
                base = dict(spade.timings_), spade.bytes_read_
        per = len(queries) - 1
        seconds = time.perf_counter() - t0
        timings = {k: round((v - base[0].get(k, 0.0)) / per, 4) for k, v in spade.timings_.items()}
        return {"cache": "cold" if cold else "warm", "s_per_image": round(seconds / per, 4),
                "stage1_s": timings.get("stage1"), "stage2_s": timings.get("stage2"),
                "gallery_io_s": timings.get("gallery_io"), "backbone_s": timings.get("backbone"),
                "mb_read_per_query": round((spade.bytes_read_ - base[1]) / per / 1e6, 2)}


def plot(records: list[dict], path: Path) -> None:
    """Seconds per image by stage, per corpus size and storage, cold beside warm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in records if "cache" in r), key=lambda r: (r["images"], r["storage"], r["cache"]))
    labels = [f"{r['images']:,}\n{r['storage']}\n{r['cache']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.5))
    bottom = [0.0] * len(rows)
    for stage in ("backbone_s", "stage1_s", "gallery_io_s", "stage2_s"):
        values = [r.get(stage) or 0.0 for r in rows]
        ax.bar(range(len(rows)), values, bottom=bottom, label=stage.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, r in enumerate(rows):
        ax.text(i, bottom[i], f"{r['mb_read_per_query']:.0f} MB", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("seconds per image (K=50)")
    ax.set_title("scoring cost by corpus size and stored representation (MB read per query on top)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000])
    ap.add_argument("--storage", default="compact")
    ap.add_argument("--bases", type=int, default=40)
    ap.add_argument("--queries", type=int, default=13, help="real magnetic_tile test images (the first is warm-up)")
    ap.add_argument("--k-gallery", type=int, default=50)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--plot", metavar="JSONL", help="only draw DIR/scale.png from the JSON lines of earlier runs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        plot([json.loads(line) for line in Path(args.plot).read_text().splitlines()], out / "scale.png")
        return
    emit(bench="scale", machine=machine(), storage=args.storage)
    base_path = bases(out, args.storage, args.bases)
    queries = real_images("test", args.queries)
    extractor = Spade.open(base_path, device="cpu").load_backbone().extractor_
    records = []
    for n in args.sizes:
        path = out / f"scale_{n}.h5"
        path.unlink(missing_ok=True)
        built = build(path, base_path, n)
        with FeatureStore.open(path) as s:
            info = s.describe()
        rec = dict(bench="scale", images=n, storage=args.storage, **built, file_gb=round(info["bytes"] / 1e9, 2),
                   bytes_per_image=info["bytes_per_image"])
        emit(**rec)
        for cold in (True, False):
            r = dict(bench="scale", images=n, storage=args.storage, k_gallery=args.k_gallery,
                     **score(path, queries, extractor, cold, args.k_gallery), peak_rss_mb=round(peak_rss_mb()))
            emit(**r)
            records.append(r)
        if not args.keep:
            path.unlink()
            path.with_suffix(".faiss").unlink(missing_ok=True)  # the image index's sidecar, when large
    (out / "scale.json").write_text(json.dumps(records, indent=1))
    plot(records, out / "scale.png")


if __name__ == "__main__":
    main()
