"""Frames per second of ``spade-faiss watch`` (issue 37): stage 1 only (``--maps none``), gated
stage 2 (``--maps auto``: maps only for frames above tau) and every frame (``--maps all``),
per backbone, as whole processes with default outputs.

Workload (real images from ../shared/data/magnetic_tile): a corpus of ``--normals`` normal
images (every 10th of the rest held out for calibration: tau at the default fpr), and a test
"camera" video of ``--frames`` test images (interleaved over the defect classes, each resized
to 256x256, MJPG at 400 fps: faster than any scoring, so frames are never starved) watched with
``--buffer`` as large as the video (no frame dropped: every frame is scored, so the rate is
the scorer's). ``--weights none``: random init (no weights can be downloaded here; the same
shapes and costs). JSON lines on stdout (and ``--out``/watch.jsonl).

    python benchmarks/bench_watch.py --out /tmp/bw                      # resnet18 and wide_resnet50_2
    python benchmarks/bench_watch.py --out /tmp/bw --backbones resnet18 --normals 100 --frames 30
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, begin, emit_to, process, real_images  # noqa: E402

JSONL = "watch.jsonl"

SPADE = [sys.executable, "-m", "spade_faiss"]


def make_video(paths: list[str], out: Path) -> Path:
    import cv2

    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), 400.0, (256, 256))
    for p in paths:
        writer.write(cv2.resize(cv2.imread(p, cv2.IMREAD_COLOR), (256, 256), interpolation=cv2.INTER_AREA))
    writer.release()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for corpora, runs, logs and watch.jsonl")
    ap.add_argument("--backbones", nargs="*", default=["resnet18", "wide_resnet50_2"])
    ap.add_argument("--normals", type=int, default=200, help="normal images indexed")
    ap.add_argument("--frames", type=int, default=60, help="test images in the watched video")
    args = ap.parse_args()
    out = begin(args.out, JSONL, "watch")
    train = real_images("train", args.normals + args.normals // 9 + 1, DATA)
    held = train[::10]
    normals = [p for p in train if p not in set(held)][:args.normals]
    lists = {}
    for name, paths in (("normals", normals), ("held", held)):
        lists[name] = out / f"{name}.txt"
        lists[name].write_text("\n".join(paths) + "\n")
    video = make_video(real_images("test", args.frames, DATA), out / "line.avi")
    for backbone in args.backbones:
        corpus = out / f"{backbone}.h5"
        corpus.unlink(missing_ok=True)
        process([*SPADE, "index", lists["normals"], "--out", corpus, "--backbone", backbone, "--weights", "none"],
            out / f"index_{backbone}.log")
        process([*SPADE, "calibrate", corpus, lists["held"]], out / f"calibrate_{backbone}.log")
        for maps in ("none", "auto", "all"):
            rec = process([*SPADE, "watch", video, corpus, "--out", out / f"run_{backbone}_{maps}", "--restart",
                           "--maps", maps, "--buffer", args.frames + 1], out / f"watch_{backbone}_{maps}.log",
                          stdout=True)
            s = json.loads(rec.pop("last_line"))
            emit_to(out / JSONL, bench="watch", backbone=backbone, maps=maps, normals=len(normals), frames=s["scored"],
                 dropped=s["dropped"], flagged=s["flagged"], frames_per_s=s["frames_per_s"],
                 s_per_frame=round(s["seconds"] / max(1, s["scored"]), 3), process_seconds=rec["seconds"],
                 peak_rss_mb=rec["peak_rss_mb"])
        corpus.unlink()


if __name__ == "__main__":
    main()
