"""Scaling benchmark: scoring cost and memory vs corpus size. Synthetic features are written
through the real FeatureStore (crop 64 by default so 10k images fit in ~2 GB; the patch search
per query is independent of N by construction, which is what this shows), then each size is
queried in a fresh subprocess: stage 1 (Flat and IVF), gallery I/O, stage 2, peak RSS. Prints
JSON lines and writes a plot.

    .venv/bin/python benchmarks/bench_scaling.py                         # N = 100, 1k, 10k
    .venv/bin/python benchmarks/bench_scaling.py --sizes 100000          # large: ~23 GB of disk
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, machine, peak_rss_mb  # noqa: E402

from spade_faiss import patch_search  # noqa: E402
from spade_faiss.config import SpadeConfig  # noqa: E402
from spade_faiss.galleries import GalleryCache  # noqa: E402
from spade_faiss.image_index import ImageIndex  # noqa: E402
from spade_faiss.store import FeatureStore  # noqa: E402

SHAPES = {"layer1": (16, 16, 256), "layer2": (8, 8, 512), "layer3": (4, 4, 1024)}
POOL_DIM = 2048


def build(path: str, n: int) -> None:
    cfg = SpadeConfig(crop=64, resize=72, weights_sha256="synthetic")
    rng = np.random.default_rng(n)
    centres = rng.standard_normal((64, POOL_DIM), dtype=np.float32) * 2
    with FeatureStore.create(path, cfg, SHAPES, POOL_DIM) as store:
        for s in range(0, n, 256):
            b = min(256, n - s)
            feats = {lv: rng.random((b, *sh), dtype=np.float32).astype(np.float16) for lv, sh in SHAPES.items()}
            feats["pool"] = centres[rng.integers(0, 64, b)] + rng.standard_normal((b, POOL_DIM), dtype=np.float32)
            store.append([f"img{i}" for i in range(s, s + b)], [f"{i:064d}" for i in range(s, s + b)], feats)
        ImageIndex.build(store.pool(), "flat").save(store)


def query(path: str, k: int, nq: int) -> dict:
    rng = np.random.default_rng(0)
    with FeatureStore.open(path) as store:
        n = len(store)
        t = time.perf_counter()
        flat = ImageIndex.load(store)
        load_s = time.perf_counter() - t
        pool = store.pool(0, nq) + rng.standard_normal((nq, POOL_DIM), dtype=np.float32) * 0.1
        out = {"n": n, "index_load_s": round(load_s, 3)}
        t = time.perf_counter()
        _, ids = flat.search(pool, k)
        out["stage1_flat_ms"] = round((time.perf_counter() - t) / nq * 1e3, 3)
        if n >= 39 * 4:
            ivf = ImageIndex.build(store.pool(), "ivf")
            t = time.perf_counter()
            _, ivf_ids = ivf.search(pool, k)
            out["stage1_ivf_ms"] = round((time.perf_counter() - t) / nq * 1e3, 3)
            out["ivf_recall"] = round(float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ivf_ids, ids)])), 4)

        def load(keys):
            rows = np.array(keys, dtype=np.int64)
            return [{lv: a.astype(np.float32) for lv, a in zip(SHAPES, per)}
                    for per in zip(*(store.level(lv, rows) for lv in SHAPES))]
        cache = GalleryCache(load, 1 << 30)
        io = s2 = 0.0
        for i in range(nq):
            t = time.perf_counter()
            gal = cache.get([int(j) for j in ids[i]])
            io += time.perf_counter() - t
            q = {lv: rng.random((1, *sh), dtype=np.float32) for lv, sh in SHAPES.items()}
            t = time.perf_counter()
            for lv in SHAPES:
                patch_search.level_maps(q[lv], [g[lv] for g in gal])
            s2 += time.perf_counter() - t
        out.update(gallery_io_ms=round(io / nq * 1e3, 2), stage2_ms=round(s2 / nq * 1e3, 2),
                   cache_hit_rate=round(cache.hit_rate, 3), peak_rss_mb=round(peak_rss_mb()))
    return out


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns = [r["n"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ns, [r["stage1_flat_ms"] for r in rows], "o-", label="stage 1, Flat")
    ivf = [r for r in rows if "stage1_ivf_ms" in r]
    ax[0].plot([r["n"] for r in ivf], [r["stage1_ivf_ms"] for r in ivf], "o-", label="stage 1, IVF (auto nlist)")
    ax[0].plot(ns, [r["stage2_ms"] for r in rows], "o-", label="stage 2 (K galleries)")
    ax[0].plot(ns, [r["gallery_io_ms"] for r in rows], "o-", label="gallery I/O")
    ax[0].set(xscale="log", yscale="log", xlabel="images in the corpus", ylabel="ms per query", title="time")
    ax[1].plot(ns, [r["peak_rss_mb"] for r in rows], "o-")
    ax[1].set(xscale="log", xlabel="images in the corpus", ylabel="peak RSS (MB)", title="memory of a scorer")
    for a in ax:
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--dir", default=None, help="where the synthetic corpora go (default: a temp dir)")
    ap.add_argument("--out", default="bench-out", help="folder of the plot (created)")
    ap.add_argument("--quick", action="store_true", help="100 and 1000 images, 5 queries")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.queries = "100,1000", 5
    if args.child:
        print(json.dumps(query(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    emit(bench="scaling", step="machine", **machine())
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for n in map(int, args.sizes.split(",")):
            path = os.path.join(d, f"n{n}.h5")
            t = time.perf_counter()
            build(path, n)
            built = time.perf_counter() - t
            out = subprocess.run([sys.executable, __file__, "--child", path, str(args.k), str(args.queries)],
                                 check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row.update(build_s=round(built, 1), store_mb=round(os.path.getsize(path) / 2**20))
            emit(bench="scaling", k_gallery=args.k, **row)
            rows.append(row)
            os.remove(path)
    os.makedirs(args.out, exist_ok=True)
    plot(rows, os.path.join(args.out, "scaling.png"))


if __name__ == "__main__":
    main()
