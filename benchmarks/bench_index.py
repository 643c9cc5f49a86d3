"""Indexing benchmark: throughput of `Spade.add` vs the bare backbone forward at the same batch
size, and peak RSS vs corpus size. Each configuration runs in a fresh subprocess so its peak
RSS is its own. Prints JSON lines.

    .venv/bin/python benchmarks/bench_index.py --out bench-out       # defaults below
    .venv/bin/python benchmarks/bench_index.py --quick               # resnet18, generated images
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import dataset_images, emit, machine, peak_rss_mb  # noqa: E402


def bare_forward(backbone: str, batch: int, n: int) -> dict:
    import torch

    from spade_faiss.backbone import FeatureExtractor
    ext = FeatureExtractor(backbone, weights=None, device="cpu")
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32))
    with torch.inference_mode():
        ext.model(x)
        t = time.perf_counter()
        for _ in range(max(1, n // batch)):
            ext.model(x)
    wall = time.perf_counter() - t
    return {"images_per_s": round(max(1, n // batch) * batch / wall, 3)}


def index_run(backbone: str, batch: int, paths: list[str]) -> dict:
    from spade_faiss.detector import Spade
    with tempfile.TemporaryDirectory() as d:
        with Spade.create(os.path.join(d, "c.h5"), backbone=backbone, weights=None, device="cpu",
                          batch_size=batch) as spade:
            t = time.perf_counter()
            report = spade.add(paths)
            wall = time.perf_counter() - t
            size = spade.info()["bytes"]
    return {"images": report.added, "images_per_s": round(report.added / wall, 3), "seconds": round(wall, 1),
            "bytes_per_image": int(size / max(1, report.added)), "peak_rss_mb": round(peak_rss_mb())}


def synthetic_paths(n: int, folder: str) -> list[str]:
    from spade_faiss.synthetic import texture, write_png
    out = []
    for i in range(n):
        p = os.path.join(folder, f"{i:05d}.png")
        if not os.path.exists(p):  # seeded per file: every image is unique and reproducible
            write_png(Path(p), texture(np.random.default_rng(i), (96, 96)))
        out.append(p)
    return out


def child(args) -> None:
    spec = json.loads(args.child)
    if spec["what"] == "bare":
        print(json.dumps(bare_forward(spec["backbone"], spec["batch"], spec["n"])))
    else:
        paths = dataset_images(Path(spec["folder"]), spec["n"], 2, spec["source"] == "generated")[0] \
            if spec["source"] != "synthetic" else synthetic_paths(spec["n"], spec["folder"])
        print(json.dumps(index_run(spec["backbone"], spec["batch"], paths)))


def run_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="wide_resnet50_2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--throughput-n", type=int, default=48, help="real images for the throughput ratio")
    ap.add_argument("--rss-backbone", default="resnet18", help="backbone for the memory-vs-size runs")
    ap.add_argument("--rss-ns", default="200,2000")
    ap.add_argument("--out", default="bench-out", help="folder for generated images (created)")
    ap.add_argument("--quick", action="store_true", help="resnet18, 16 generated images, memory at 50")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.backbone, args.throughput_n, args.rss_ns = "resnet18", 16, "50"
    os.makedirs(args.out, exist_ok=True)
    emit(bench="index", step="machine", **machine())
    bare = run_child({"what": "bare", "backbone": args.backbone, "batch": args.batch, "n": args.throughput_n})
    full = run_child({"what": "index", "source": "generated" if args.quick else "real", "backbone": args.backbone,
                      "batch": args.batch, "n": args.throughput_n, "folder": args.out})
    emit(bench="index", step="throughput", backbone=args.backbone, batch=args.batch, bare_forward=bare, index=full,
         ratio_to_bare=round(full["images_per_s"] / bare["images_per_s"], 3))
    with tempfile.TemporaryDirectory() as folder:
        for n in (int(v) for v in args.rss_ns.split(",") if v):
            r = run_child({"what": "index", "source": "synthetic", "backbone": args.rss_backbone,
                           "batch": args.batch, "n": n, "folder": folder})
            emit(bench="index", step="memory", backbone=args.rss_backbone, n=n, **r)


if __name__ == "__main__":
    main()
