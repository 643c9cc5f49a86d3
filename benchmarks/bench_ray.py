"""Ray benchmark: indexing and scoring throughput, one process vs a local Ray cluster (same
machine, same images). Prints JSON lines.

    .venv/bin/python benchmarks/bench_ray.py --out bench-out          # resnet18, 60 + 24 images
    .venv/bin/python benchmarks/bench_ray.py --quick                  # generated, 12 + 4 images
    .venv/bin/python benchmarks/bench_ray.py --backbone wide_resnet50_2 --n-train 32 --n-test 8
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from pathlib import Path  # noqa: E402

from common import dataset_images, emit, machine  # noqa: E402


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--n-train", type=int, default=60)
    ap.add_argument("--n-test", type=int, default=24)
    ap.add_argument("--ray-workers", type=int, default=2)
    ap.add_argument("--k-gallery", type=int, default=10)
    ap.add_argument("--out", default="bench-out", help="folder for generated images (created)")
    ap.add_argument("--quick", action="store_true", help="generated data, 12 + 4 images")
    args = ap.parse_args()
    if args.quick:
        args.n_train, args.n_test = 12, 4
    os.makedirs(args.out, exist_ok=True)
    train_paths, test_paths, _ = dataset_images(Path(args.out), args.n_train, args.n_test, generated=args.quick)
    emit(bench="ray", step="machine", **machine())
    cli = [sys.executable, "-m", "spade_faiss"]
    feat = ["--backbone", args.backbone, "--weights", "none", "--device", "cpu"]
    with tempfile.TemporaryDirectory() as d:
        train, test = os.path.join(d, "train.txt"), os.path.join(d, "test.txt")
        open(train, "w").write("\n".join(train_paths))
        open(test, "w").write("\n".join(test_paths))
        ray = ["--backend", "ray", "--ray-workers", str(args.ray_workers)]
        for engine, extra in [("local", []), ("ray", ray)]:
            store = os.path.join(d, f"{engine}.h5")
            t_index = timed(cli + ["index", train, "--out", store, *feat, *extra])
            t_score = timed(cli + ["score", store, test, "--out", os.path.join(d, f"run-{engine}"), "--device", "cpu",
                                   "--k-gallery", str(args.k_gallery), "--no-overlays", *extra])
            emit(bench="ray", engine=engine, backbone=args.backbone, workers=args.ray_workers if extra else 1,
                 index_images=args.n_train, index_s=round(t_index, 1),
                 index_images_per_s=round(args.n_train / t_index, 2), score_images=args.n_test,
                 score_s=round(t_score, 1), score_images_per_s=round(args.n_test / t_score, 2),
                 note="wall time of the whole command, start-up (and Ray cluster start) included")


if __name__ == "__main__":
    main()
