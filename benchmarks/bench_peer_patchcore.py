"""What a user would pick instead, side by side: PatchCore (the authors' code, in its own
virtual environment: ``benchmarks/peers/setup_patchcore.sh``) on the user-run benchmark's
workload (``bench_user_run.py``): the same 685 magnetic_tile normals, the same 583 test images,
the same weights file (Wide-ResNet50-2, this project's seeded random init, saved with
``torch.save``; no ImageNet weights can be downloaded here), the same square resize 256 and
centre crop 224. Reported as JSON lines: fit and score seconds per image, the peer process's
peak RSS (``wait4``), the memory bank's bytes on disk, and pixel AUROC, AU-PRO and image AUROC
from its maps and scores with this project's metrics and masks.

    benchmarks/peers/setup_patchcore.sh /tmp/pcvenv /tmp/patchcore-inspection
    python benchmarks/bench_peer_patchcore.py --python /tmp/pcvenv/bin/python \\
        --peer-src /tmp/patchcore-inspection/src --out /tmp/peer
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from bench_user_run import interleaved_test, split_normals, write_list
from common import DATA, begin, emit_to, process

from spade_faiss import images, metrics
from spade_faiss.backbone import _random_init
from spade_faiss.datasets import discover

RESULTS = "peer_patchcore.jsonl"


def evaluate(npz: Path, root: Path, resize: int, crop: int) -> dict:
    """Pixel AUROC, AU-PRO and image AUROC of the peer's maps and scores (this project's metrics)."""
    got = np.load(npz)
    samples = {s.path: s for s in discover(root, split="test")}
    masks, labels = [], []
    for p in got["paths"]:
        s = samples[str(p)]
        size = images.load_image(s.path).size if s.mask else (0, 0)
        masks.append(images.load_mask(s.mask, size, resize, crop))
        labels.append(int(s.label))
    maps = got["maps"].astype(np.float32)
    gt = np.stack(masks)
    return {"pixel_auroc": metrics.pixel_auroc(gt, maps), "au_pro": metrics.au_pro(gt, maps),
            "image_auroc": metrics.auroc(np.array(labels), got["scores"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", required=True, help="the peer venv's python")
    ap.add_argument("--peer-src", required=True, help="patchcore-inspection's src/ folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--quick", action="store_true", help="60 normals, 24 test images")
    ap.add_argument("--coreset", type=float, default=0.1, help="the coreset's fraction of the patches (paper: 0.1)")
    args = ap.parse_args()
    out = begin(args.out, RESULTS, "peer_patchcore")
    root = Path(args.data)
    indexed, _ = split_normals([s.path for s in discover(root, split="train")])
    test = interleaved_test(root)
    if args.quick:
        indexed, test = indexed[:60], test[:24]
    weights = out / "wide_resnet50_2_seed0.pt"
    torch.save(_random_init("wide_resnet50_2", 0), weights)
    cmd = [args.python, Path(__file__).parent / "peers" / "patchcore_run.py",
           "--train-list", write_list(out / "indexed.txt", indexed), "--test-list", write_list(out / "test.txt", test),
           "--weights", weights, "--out", out / "patchcore", "--coreset", args.coreset]
    env = {**os.environ, "PYTHONPATH": args.peer_src}
    run = process(cmd, out / "patchcore.log", env=env)
    lines = [line for line in (out / "patchcore.log").read_text().splitlines() if line.startswith("{")]
    emit_to(out / RESULTS, bench="peer_patchcore", step="process", indexed=len(indexed), test=len(test),
            coreset=args.coreset, **run)
    for line in lines:
        emit_to(out / RESULTS, bench="peer_patchcore", step="peer", record=line)
    emit_to(out / RESULTS, bench="peer_patchcore", step="accuracy",
            **evaluate(out / "patchcore" / "patchcore.npz", root, 256, 224))


if __name__ == "__main__":
    main()
