"""Patch-search (stage 2) benchmark on synthetic features of the default shapes: time per query
image of the faiss engine vs K, pixel mode and thread count, compared in the same run with (a)
one sgemm of the same FLOP count (the hardware limit) and (b) a plain torch ``cdist``
implementation of the same math. GPU rows when faiss-gpu sees a GPU. Random features have no
structure for the pruned engine's bounds to use: its numbers on real features are in
bench_score.py. Prints JSON lines.

    .venv/bin/python benchmarks/bench_patch_search.py
    .venv/bin/python benchmarks/bench_patch_search.py --quick          # K=5, per_level, all cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import faiss
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, machine  # noqa: E402

from spade_faiss import patch_search  # noqa: E402
from spade_faiss.resample import concat_levels  # noqa: E402

SHAPES = {"layer1": (56, 56, 256), "layer2": (28, 28, 512), "layer3": (14, 14, 1024)}


def features(rng, k: int, mode: str):
    """Query and K gallery images per level (one 'concat' level in concat mode)."""
    q = {lv: rng.random((1, *s), dtype=np.float32) for lv, s in SHAPES.items()}
    g = {lv: [rng.random(s, dtype=np.float32) for _ in range(k)] for lv, s in SHAPES.items()}
    if mode == "concat":
        q = {"concat": concat_levels(list(q.values()))}
        g = {"concat": [concat_levels([g[lv][i][None] for lv in SHAPES])[0] for i in range(k)]}
    return q, g


def ours(q, g, device):
    return [patch_search.level_maps(q[n], g[n], 1, device) for n in q]


def torch_cdist(q, g):
    """The same math with torch.cdist, gallery in 20k-row blocks (a 2 GB matrix otherwise)."""
    out = []
    for n in q:
        x = torch.from_numpy(q[n].reshape(-1, q[n].shape[-1]))
        best = torch.full((x.shape[0],), float("inf"))
        gal = torch.from_numpy(np.concatenate([a.reshape(-1, a.shape[-1]) for a in g[n]]))
        for s in range(0, gal.shape[0], 20_000):
            best = torch.minimum(best, (torch.cdist(x, gal[s:s + 20_000]) ** 2).min(1).values)
        out.append(best.numpy())
    return out


def sgemm(q, g, rng):
    total = 0.0
    for n in q:
        x = np.ascontiguousarray(q[n].reshape(-1, q[n].shape[-1]))
        gal = g[n][0].reshape(-1, x.shape[1])
        block = np.concatenate([gal] * max(1, 16384 // gal.shape[0]))
        ng = sum(a.shape[0] * a.shape[1] for a in g[n])
        x @ block[:8].T
        t = time.perf_counter()
        for s in range(0, ng, block.shape[0]):
            x @ block[: min(block.shape[0], ng - s)].T
        total += time.perf_counter() - t
    return total


def best_of(repeat, fn, *args):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="5,10,50")
    ap.add_argument("--modes", default="per_level,concat")
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cdist-max-k", type=int, default=10, help="the torch baseline is slow: only K up to this")
    ap.add_argument("--out", default="bench-out", help="unused: this benchmark writes nothing")
    ap.add_argument("--quick", action="store_true", help="K=5, per_level, all cores, one repeat")
    args = ap.parse_args()
    if args.quick:
        args.ks, args.modes, args.threads, args.repeat = "5", "per_level", str(os.cpu_count()), 1
    emit(bench="patch_search", step="machine", **machine())
    rng = np.random.default_rng(0)
    devices = ["cpu"] + (["cuda"] if patch_search.gpu_available() else [])
    for mode in args.modes.split(","):
        for k in map(int, args.ks.split(",")):
            q, g = features(rng, k, mode)
            flops = sum(2 * q[n][0].size // q[n].shape[-1] * sum(a.size for a in g[n]) for n in q)
            for threads in map(int, args.threads.split(",")):
                faiss.omp_set_num_threads(threads)
                torch.set_num_threads(threads)
                limit = best_of(args.repeat, sgemm, q, g, rng)
                row = dict(bench="patch_search", mode=mode, k_gallery=k, threads=threads,
                           gflop=round(flops / 1e9, 1), sgemm_all_cores_s=round(limit, 3))
                all_cores = threads == os.cpu_count()
                for dev in devices:
                    if dev == "cuda" and not all_cores:
                        continue
                    s = best_of(args.repeat, ours, q, g, dev)
                    row[f"ours_{dev}_s"] = round(s, 3)
                    if all_cores:  # numpy's BLAS always uses every core: compare like with like
                        row[f"ours_{dev}_ratio_to_sgemm"] = round(s / limit, 2)
                if k <= args.cdist_max_k:
                    s = best_of(1, torch_cdist, q, g)
                    row["torch_cdist_s"] = round(s, 3)
                    row["speedup_vs_cdist"] = round(s / row["ours_cpu_s"], 1)
                emit(**row)


if __name__ == "__main__":
    main()
