"""Backbones side by side (issue 38): the paper's WRN50-2 at 224 against DINOv2 ViTs at 448 (the
2026 retrieval method's input size), as whole CLI processes with default outputs on real images.

Per backbone: ``index`` of ``--normals`` real normal images (seconds, bytes per image, peak RSS),
then ``score`` of ``--tests`` real test images (maps, overlays, report): seconds per image, the
library's per-stage seconds per image (run.json), peak RSS. ``--weights none`` (random init: no
weights can be downloaded here; the shapes, and so the costs, are the real ones). JSON lines on
stdout and ``--out``/backbones.jsonl.

    python benchmarks/bench_backbones.py --out /tmp/bb
    python benchmarks/bench_backbones.py --out /tmp/bb --normals 30 --tests 6 --backbones vit_small_patch14_dinov2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, begin, emit_to, process, real_images  # noqa: E402

JSONL = "backbones.jsonl"

SPADE = [sys.executable, "-m", "spade_faiss"]
SIZES = {"wide_resnet50_2": (256, 224), "vit_small_patch14_dinov2": (512, 448),
         "vit_base_patch14_dinov2": (512, 448)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--backbones", nargs="*", default=list(SIZES))
    ap.add_argument("--normals", type=int, default=60)
    ap.add_argument("--tests", type=int, default=12)
    args = ap.parse_args()
    out = begin(args.out, JSONL, "backbones")
    lists = {}
    for name, paths in (("normals", real_images("train", args.normals, DATA)),
                        ("tests", real_images("test", args.tests, DATA))):
        lists[name] = out / f"{name}.txt"
        lists[name].write_text("\n".join(paths) + "\n")
    for backbone in args.backbones:
        resize, crop = SIZES[backbone]
        corpus = out / f"{backbone}.h5"
        corpus.unlink(missing_ok=True)
        rec = process([*SPADE, "index", lists["normals"], "--out", corpus, "--backbone", backbone, "--weights", "none",
                   "--resize", resize, "--crop", crop], out / f"index_{backbone}.log")
        emit_to(out / JSONL, bench="backbones", backbone=backbone, step="index", crop=crop, images=args.normals, **rec,
             s_per_image=round(rec["seconds"] / args.normals, 3),
             bytes_per_image=round(corpus.stat().st_size / args.normals))
        rec = process([*SPADE, "score", corpus, lists["tests"], "--out", out / f"run_{backbone}", "--restart"],
                  out / f"score_{backbone}.log")
        stages = json.loads((out / f"run_{backbone}" / "run.json").read_text())["runs"][-1]["stage_seconds"]
        emit_to(out / JSONL, bench="backbones", backbone=backbone, step="score", crop=crop, images=args.tests, **rec,
             s_per_image=round(rec["seconds"] / args.tests, 3),
             stage_s_per_image={k: round(v / args.tests, 4) for k, v in stages.items()})
        corpus.unlink()


if __name__ == "__main__":
    main()
