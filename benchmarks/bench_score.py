"""Scoring benchmark: stage-2 time per image vs one sgemm of the same FLOP count (the hardware
limit, timed in the same run), for K and both pixel modes; gallery I/O and cache hit rate;
end-to-end images/s with the time per stage, and peak RSS. Prints JSON lines.

    .venv/bin/python benchmarks/bench_score.py                 # 60 normal + 12 test real images
    .venv/bin/python benchmarks/bench_score.py --ks 5 --modes per_level --n-test 2   # quick
    .venv/bin/python benchmarks/bench_score.py --end-to-end-only --cache-gb 1        # defaults, peak RSS
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import ROOT, emit, machine, peak_rss_mb, real_images  # noqa: E402

from spade_faiss.detector import Spade  # noqa: E402


def build_corpus(path: str, n_train: int, backbone: str, dtype: str) -> None:
    if os.path.exists(path):
        return
    with Spade.create(path, backbone=backbone, weights=None, dtype=dtype, device="cpu") as spade:
        spade.add(real_images("train", n_train))


def sgemm_seconds(shapes: list[tuple[int, int, int]], rng) -> float:
    """Time (q @ g.T) for each (nq, ng, C), in column blocks so the output stays ~200 MB."""
    total = 0.0
    for nq, ng, c in shapes:
        q = rng.standard_normal((nq, c), dtype=np.float32)
        block = max(1, (50 * 2**20) // nq)
        g = rng.standard_normal((min(ng, block), c), dtype=np.float32)
        q @ g[:16].T  # warm up the BLAS threads
        t = time.perf_counter()
        for start in range(0, ng, block):
            q @ g[: min(block, ng - start)].T
        total += time.perf_counter() - t
    return total


def stage2_shapes(spade: Spade, k: int, mode: str) -> list[tuple[int, int, int]]:
    shapes = spade.store_.level_shapes
    if mode == "concat":
        h, w, _ = shapes["layer1"]
        return [(h * w, k * h * w, sum(s[2] for s in shapes.values()))]
    return [(h * w, k * h * w, c) for h, w, c in shapes.values()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=60)
    ap.add_argument("--n-test", type=int, default=12)
    ap.add_argument("--n-test-concat", type=int, default=2, help="concat costs 6x: fewer images")
    ap.add_argument("--ks", default="5,10,50")
    ap.add_argument("--modes", default="per_level,concat")
    ap.add_argument("--backbone", default="wide_resnet50_2")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--cache-gb", type=float, default=2.0, help="the library default is 1")
    ap.add_argument("--end-to-end-only", action="store_true",
                    help="only the end-to-end row, in this fresh process (for its peak RSS)")
    ap.add_argument("--store", default=None, help="corpus to build or reuse (default indexes/bench_*.h5)")
    args = ap.parse_args()
    store = args.store or str(ROOT / "indexes" / f"bench_{args.backbone}_{args.n_train}_{args.dtype}.h5")
    t = time.perf_counter()
    build_corpus(store, args.n_train, args.backbone, args.dtype)
    emit(bench="score", step="corpus", store=store, seconds=round(time.perf_counter() - t, 1), **machine())
    test = real_images("test", args.n_test)
    rng = np.random.default_rng(0)
    spade = Spade.open(store, weights=None, device="cpu", cache_bytes=int(args.cache_gb * 2**30))
    spade.score(test[:1])  # warm up: model, BLAS threads
    for mode in ([] if args.end_to_end_only else args.modes.split(",")):
        for k in map(int, args.ks.split(",")):
            queries = test if mode == "per_level" else test[: args.n_test_concat]
            spade.pixel_mode, spade.k_gallery = mode, k
            spade.k_image = min(5, k)
            spade.cache_ = None
            spade.cache_mode_ = None  # a cold cache for each configuration
            spade.timings_.clear()
            spade.score(queries)
            cache = spade.cache_
            per = {s: v / len(queries) for s, v in spade.timings_.items()}
            shapes = stage2_shapes(spade, k, mode)
            flops = sum(2 * nq * ng * c for nq, ng, c in shapes)
            limit = sgemm_seconds(shapes, rng)
            emit(bench="score", step="stage2", mode=mode, k_gallery=k, images=len(queries),
                 stage2_s=round(per["stage2"], 3), sgemm_s=round(limit, 3),
                 ratio_to_sgemm=round(per["stage2"] / limit, 2), gflop=round(flops / 1e9, 1),
                 gflops_per_s=round(flops / per["stage2"] / 1e9, 1), gallery_io_s=round(per["gallery_io"], 3),
                 gallery_mb_read_per_image=round(cache.bytes_read / len(queries) / 2**20, 1),
                 cache_hit_rate=round(cache.hit_rate, 3))
    # End to end at the defaults (per_level, K=50), warm cache as in a long batch run.
    spade.pixel_mode, spade.k_gallery, spade.k_image = "per_level", 50, 5
    spade.timings_.clear()
    t = time.perf_counter()
    spade.score(test)
    wall = time.perf_counter() - t
    shares = {s: round(v / wall, 3) for s, v in spade.timings_.items()}
    shares["decode_and_rest"] = round(1 - sum(shares.values()), 3)
    emit(bench="score", step="end_to_end", cache_gb=args.cache_gb, images=len(test),
         seconds_per_image=round(wall / len(test), 3),
         images_per_s=round(len(test) / wall, 3), share=shares, peak_rss_mb=round(peak_rss_mb()),
         cache_hit_rate=round(spade.cache_.hit_rate, 3))
    spade.close()


if __name__ == "__main__":
    main()
