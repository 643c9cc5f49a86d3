"""Locality-restricted stage 2 (``search="window"``) against the exact search: pixel AUROC,
AU-PRO, image AUROC and stage-2 time per image for radius r in {0, 1, 2, 4, 8} and exact, on
real images (magnetic_tile, every defect class) and on synthetic misaligned data (normals shifted
and rotated). Prints JSON lines and writes locality.png under --out.

    .venv/bin/python benchmarks/bench_locality.py --out bench-out
    .venv/bin/python benchmarks/bench_locality.py --out bench-out --quick   # resnet18, small sets
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import DATA, emit, machine  # noqa: E402

from spade_faiss import Spade, datasets, images, metrics  # noqa: E402
from spade_faiss.synthetic import paste_defect, texture, write_png  # noqa: E402

RADII = (0, 1, 2, 4, 8, None)  # None: the exact search


def misaligned_dataset(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """An object (a bright ring with a bar) on a texture, shifted by up to 20% and rotated by up
    to 30 degrees in every image; test images get pasted defects with masks."""
    rng = np.random.default_rng(seed)

    def draw():
        img = texture(rng, (160, 160))
        canvas = np.zeros((160, 160), np.uint8)
        cv2.circle(canvas, (80, 80), 40, 255, 8)
        cv2.rectangle(canvas, (74, 30), (86, 130), 255, -1)
        m = cv2.getRotationMatrix2D((80, 80), float(rng.uniform(-30, 30)), 1.0)
        m[:, 2] += rng.uniform(-32, 32, 2)
        canvas = cv2.warpAffine(canvas, m, (160, 160))
        img[canvas > 127] = (230, 200, 60)
        return img
    for i in range(n_train):
        write_png(root / "train" / "good" / f"{i:03d}.png", draw())
    for i in range(n_test // 2):
        write_png(root / "test" / "good" / f"{i:03d}.png", draw())
    for i in range(n_test - n_test // 2):
        img, mask = paste_defect(rng, draw())
        write_png(root / "test" / "defect" / f"{i:03d}.png", img)
        write_png(root / "ground_truth" / "defect" / f"{i:03d}_mask.png", mask)
    return root


def interleaved_test(root: Path, n: int) -> list:
    by_class: dict = {}
    for s in datasets.discover(root, "test"):
        by_class.setdefault(s.defect, []).append(s)
    rows = [c[i] for i in range(max(map(len, by_class.values()))) for c in by_class.values() if i < len(c)]
    return rows[:n]


def study(name: str, train: list, test: list, backbone: str, k: int) -> list[dict]:
    spade = Spade(weights=None, backbone=backbone, device="cpu", k_gallery=k, k_image=min(5, k)).fit(train)
    labels = np.array([s.label for s in test])
    rows = []
    for radius in RADII:
        variant = spade.with_params(search="window" if radius is not None else "exact", radius=radius or 0)
        variant.score(test[:1])  # warm: gallery cache, projections
        variant.timings_.clear()
        t = time.perf_counter()
        r = variant.score(test)
        wall = time.perf_counter() - t
        masks = np.stack([images.load_mask(s.mask, size, spade.resize, spade.crop)
                          for s, size in zip(test, r.image_sizes)])
        m = metrics.evaluate(labels, r.image_scores, masks, r.maps)
        row = dict(bench="locality", data=name, radius="exact" if radius is None else radius, k_gallery=k,
                   images=len(test), stage2_s_per_image=round(variant.timings_["stage2"] / len(test), 4),
                   seconds_per_image=round(wall / len(test), 3), pixel_AUROC=round(m["pixel_AUROC"], 4),
                   AUPRO=round(m["AUPRO"], 4), image_AUROC=round(m["image_AUROC"], 4))
        emit(**row)
        rows.append(row)
    exact = rows[-1]
    for row in rows[:-1]:
        emit(bench="locality", data=name, radius=row["radius"], step="vs_exact",
             speedup=round(exact["stage2_s_per_image"] / row["stage2_s_per_image"], 2),
             pixel_auroc_points=round(100 * (row["pixel_AUROC"] - exact["pixel_AUROC"]), 2))
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, rows in results.items():
        x = [r["stage2_s_per_image"] for r in rows]
        y = [100 * r["pixel_AUROC"] for r in rows]
        ax.plot(x, y, marker="o", label=name)
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(f"r={r['radius']}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xscale="log", xlabel="stage-2 seconds per image (log)", ylabel="pixel AUROC (%)",
           title="window search: accuracy against time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--backbone", default="wide_resnet50_2")
    ap.add_argument("--n-train", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=60)
    ap.add_argument("--k-gallery", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="resnet18, 20 + 10 images, synthetic data only")
    args = ap.parse_args()
    if args.quick:
        args.backbone, args.n_train, args.n_test = "resnet18", 20, 10
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emit(bench="locality", step="machine", backbone=args.backbone, **machine())
    results = {}
    if DATA.is_dir() and not args.quick:
        train = [s.path for s in datasets.discover(DATA, "train")][: args.n_train]
        results["magnetic_tile"] = study("magnetic_tile", train, interleaved_test(DATA, args.n_test), args.backbone,
                                         args.k_gallery)
    root = out / "data" / f"misaligned_{args.n_train}_{args.n_test}"
    if not (root / "train").is_dir():
        misaligned_dataset(root, args.n_train, args.n_test)
    results["misaligned (synthetic)"] = study("misaligned", [s.path for s in datasets.discover(root, "train")],
                                              interleaved_test(root, args.n_test), args.backbone, args.k_gallery)
    plot(results, out / "locality.png")


if __name__ == "__main__":
    main()
