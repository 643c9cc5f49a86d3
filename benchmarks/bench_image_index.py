"""Image-index benchmark: build time, query time, memory and recall@K against Flat for Flat,
IVF (nlist and nprobe sweeps) and IVF-SQ8 on seeded clustered 2048-d vectors. Prints JSON lines
and writes a recall-vs-query-time plot.

    .venv/bin/python benchmarks/bench_image_index.py --out bench-out                 # 10k and 100k vectors
    # 1M vectors, ~17 GB RAM:
    .venv/bin/python benchmarks/bench_image_index.py --large 1000000 --queries 100 --nlist 4096 --train-per-list 32

Each size also reports the tuned default (``ImageIndex.build`` without nprobe: the smallest nprobe
reaching recall@50 0.99 leave-one-out on the corpus) against exact search on fresh queries.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, machine  # noqa: E402

from spade_faiss.image_index import ImageIndex, ivf_nlist  # noqa: E402


def clustered(n: int, d: int, seed: int, clusters: int | None = None) -> np.ndarray:
    """Vectors around seeded cluster centres, generated in blocks (bounded temporaries).

    About 500 vectors per cluster (a product line has a few modes with many images each), so
    a query's 50 nearest neighbours are real neighbours, not near-ties between far clusters.
    """
    clusters = clusters or max(10, n // 500)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32) * 2
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 50_000):
        e = min(n, s + 50_000)
        out[s:e] = centres[rng.integers(0, clusters, e - s)] + rng.standard_normal((e - s, d), dtype=np.float32)
    return out


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got, truth)]))


def timed_search(index: ImageIndex, xq, k, nprobe=None, repeat: int = 3):
    """Ids and seconds per query, the fastest of ``repeat`` batched searches (single runs here
    moved by up to 10x: thread wake-up after a build)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        _, ids = index.search(xq, k, nprobe)
        best = min(best, time.perf_counter() - t)
    return ids, best / len(xq)


def run_size(n: int, d: int, nq: int, k: int, rows: list) -> None:
    # Queries come from the same distribution as the corpus (new draws around the same centres),
    # as test images of a product line resemble its normal images.
    both = clustered(n + nq, d, seed=1)
    xb, xq = both[:n], both[n:]
    t = time.perf_counter()
    flat = ImageIndex.build(xb, "flat")
    build = time.perf_counter() - t
    timed_search(flat, xq[:5], k)
    truth, q_s = timed_search(flat, xq, k)
    rows.append(dict(n=n, index="Flat", nprobe=None, recall=1.0, query_ms=q_s * 1e3))
    tuned_default(n, xb, xq, truth, q_s * 1e3)
    emit(bench="image_index", n=n, index="Flat", build_s=round(build, 2), query_ms=round(q_s * 1e3, 3),
         recall_at_k=1.0, k=k, bytes=int(faiss.serialize_index(flat.index).nbytes))
    base = ivf_nlist(n)
    configs = [(max(1, min(nl, n // 39)), enc) for nl, enc in
               [(base // 4, "Flat"), (base, "Flat"), (base * 4, "Flat"), (base, "SQ8")]]
    for nlist, enc in dict.fromkeys(configs):  # clamping can repeat a configuration
        t = time.perf_counter()
        ivf = ImageIndex.build(xb, "ivf", nlist=nlist, encoding=enc, nprobe=max(1, nlist // 8))
        build = time.perf_counter() - t
        size = int(faiss.serialize_index(ivf.index).nbytes)
        timed_search(ivf, xq[:5], k)
        for nprobe in sorted({1, 2, 4, 16, 64, nlist // 4} & set(range(1, nlist + 1))):
            ids, q_s = timed_search(ivf, xq, k, nprobe)
            r = recall(ids, truth)
            name = f"IVF{nlist},{enc}"
            rows.append(dict(n=n, index=name, nprobe=nprobe, recall=r, query_ms=q_s * 1e3))
            emit(bench="image_index", n=n, index=name, nprobe=nprobe, build_s=round(build, 2),
                 query_ms=round(q_s * 1e3, 3), recall_at_k=round(r, 4), k=k, bytes=size)


def tuned_default(n, xb, xq, truth, exact_ms, nlist=None, max_train_points=None, target=0.99) -> dict:
    """The index ``auto`` would build, with its measured default nprobe, on fresh queries."""
    t = time.perf_counter()
    ivf = ImageIndex.build(xb, "ivf", nlist=nlist, target_recall=target, max_train_points=max_train_points)
    build = time.perf_counter() - t
    timed_search(ivf, xq[:5], truth.shape[1])  # warm: the first search of a fresh index pays page faults
    ids, q_s = timed_search(ivf, xq, truth.shape[1])
    row = dict(bench="image_index", step="tuned_default", n=n, index=ivf.factory, nprobe=ivf.nprobe,
               target_recall=target, tuning_recall=round(ivf.tuning["recall"], 4),
               recall_at_k=round(recall(ids, truth), 4), query_ms=round(q_s * 1e3, 3),
               exact_query_ms=round(exact_ms, 3), speedup_vs_exact=round(exact_ms / (q_s * 1e3), 1),
               build_s=round(build, 1), auto_keeps_ivf=ivf.tuning["ivf_ms"] < ivf.tuning["flat_ms"])
    emit(**row)
    return row


def run_large(n: int, d: int, nq: int, k: int, nlist: int, train_per_list: int) -> None:
    """At a large N: ground truth by exact faiss.knn (no second copy as a Flat index), then the
    tuned default and an nprobe sweep."""
    both = clustered(n + nq, d, seed=1)
    xb, xq = both[:n], both[n:]
    t = time.perf_counter()
    _, truth = faiss.knn(xq, xb, k)
    exact_ms = (time.perf_counter() - t) / nq * 1e3
    tuned_default(n, xb, xq, truth, exact_ms, nlist, train_per_list * nlist)
    t = time.perf_counter()
    ivf = ImageIndex.build(xb, "ivf", nlist=nlist, nprobe=1, max_train_points=train_per_list * nlist)
    build = time.perf_counter() - t
    for nprobe in sorted({1, 2, 4, 8, 32, nlist // 8}):
        ids, q_s = timed_search(ivf, xq, k, nprobe)
        emit(bench="image_index", n=n, index=f"IVF{nlist},Flat", nprobe=nprobe,
             train_points=train_per_list * nlist, build_s=round(build, 1), query_ms=round(q_s * 1e3, 3),
             exact_query_ms=round(exact_ms, 2), recall_at_k=round(recall(ids, truth), 4), k=k)


def plot(rows: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, len({r["n"] for r in rows}), figsize=(11, 4), squeeze=False)
    for ax, n in zip(axes[0], sorted({r["n"] for r in rows})):
        for name in dict.fromkeys(r["index"] for r in rows if r["n"] == n):
            pts = sorted((r["nprobe"] or 0, r["query_ms"], r["recall"]) for r in rows
                         if r["n"] == n and r["index"] == name)  # a line follows nprobe
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=name)
        ax.set(xscale="log", xlabel="query time per image (ms), nprobe rising along each line",
               ylabel="recall@50 vs Flat", title=f"N={n:,}")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--out", default="bench-out", help="folder of the plot (created)")
    ap.add_argument("--replot", help="only redraw the plot from the JSON lines of an earlier run")
    ap.add_argument("--large", type=int, help="instead: one IVF over this many vectors (e.g. 1000000)")
    ap.add_argument("--nlist", type=int, default=1024, help="with --large")
    ap.add_argument("--train-per-list", type=int, default=64, help="with --large")
    args = ap.parse_args()
    if args.replot:
        lines = [json.loads(ln) for ln in open(args.replot) if ln.startswith("{")]
        return plot([dict(n=r["n"], index=r["index"], nprobe=r.get("nprobe"), recall=r["recall_at_k"],
                          query_ms=r["query_ms"]) for r in lines if "index" in r and "step" not in r],
                    os.path.join(args.out, "image_index.png"))
    emit(bench="image_index", step="machine", **machine())
    if args.large:
        return run_large(args.large, args.dim, args.queries, args.k, args.nlist, args.train_per_list)
    rows: list = []
    for n in map(int, args.sizes.split(",")):
        run_size(n, args.dim, args.queries, args.k, rows)
    os.makedirs(args.out, exist_ok=True)
    plot(rows, os.path.join(args.out, "image_index.png"))


if __name__ == "__main__":
    main()
