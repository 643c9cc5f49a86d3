"""High-resolution parts as tiles (issue 38): 4096 x 4096 images cut into tiles of 512 at an
overlap of 64, indexed and scored as whole CLI processes with default outputs (maps, overlays,
stitched maps, ``tiled.csv``, the report).

The images are real magnetic_tile images upscaled to 4096 x 4096 with INTER_CUBIC (no larger real
images are here): ``--normals`` normal images (81 tiles each) form the corpus, and the first
``--tests`` test images (interleaved over the defect classes) are scored, once with one image and
once with all of them, so that the peak RSS of both says whether memory grows with the images.
Per step: seconds, seconds per image and per tile, peak RSS (``wait4``), and for ``score`` the
library's per-stage seconds per tile. ``--weights none`` (random init; the costs are the real
ones). JSON lines on stdout and ``--out``/tiles.jsonl.

    python benchmarks/bench_tiles.py --out /tmp/bt                       # 4 normals, 2 test images
    python benchmarks/bench_tiles.py --out /tmp/bt --normals 8 --tests 4 --size 4096 --tile 512 --overlap 64
    python benchmarks/bench_tiles.py --out /tmp/bt5 --normals 761 --tests 4 --size 2304 --tile 256 --overlap 64 \
        --extra --backbone resnet18 --resize 128 --crop 112 --storage compact      # >= 10^5 tiles
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, begin, emit_to, process  # noqa: E402

JSONL = "tiles.jsonl"
SPADE = [sys.executable, "-m", "spade_faiss"]


def upscaled(paths: list[str], folder: Path, size: int) -> list[str]:
    """``paths`` upscaled to ``size`` x ``size`` PNG files in ``folder`` (made once)."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        dest = folder / (Path(p).parent.name + "_" + Path(p).stem + ".png")
        if not dest.is_file():
            cv2.imwrite(str(dest), cv2.resize(cv2.imread(p, cv2.IMREAD_COLOR), (size, size),
                                              interpolation=cv2.INTER_CUBIC))
        out.append(str(dest))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=str(DATA), help="an MVTec-layout category of real images")
    ap.add_argument("--normals", type=int, default=4)
    ap.add_argument("--tests", type=int, default=2)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--index-only", action="store_true", help="build the corpus, then score no image")
    ap.add_argument("--score-only", action="store_true", help="score with the corpus a run before built")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="options passed to `index` (e.g. --backbone resnet18 --storage compact)")
    args = ap.parse_args()
    from bench_user_run import interleaved_test

    from spade_faiss import tiles
    from spade_faiss.datasets import discover

    out = begin(args.out, JSONL, "tiles")
    train = sorted(s.path for s in discover(Path(args.data), split="train"))
    step = max(1, len(train) // args.normals)
    normals = upscaled(train[::step][:args.normals], out / "normal", args.size)
    tests = upscaled(interleaved_test(Path(args.data))[:args.tests], out / "test", args.size)
    per_image = len(tiles.list_tiles(normals[0], tiles.Tiling(args.tile, args.overlap)))
    tiling = ["--tile", args.tile, "--tile-overlap", args.overlap, "--weights", "none"]
    store = out / "tiles.h5"
    if not args.score_only:
        index(args, out, store, normals, per_image, tiling)
    for count in [] if args.index_only else sorted({1, len(tests)}):
        listing = out / f"tests_{count}.txt"
        listing.write_text("\n".join(tests[:count]) + "\n")
        run = out / f"run_{count}"
        rec = process([*SPADE, "score", store, listing, "--out", run, "--restart", *tiling], out / f"score_{count}.log")
        last = json.loads((run / "run.json").read_text())["runs"][-1]
        n = count * per_image
        emit_to(out / JSONL, bench="tiles", step="score", images=count, tiles=n, **rec,
                s_per_image=round(rec["seconds"] / count, 2), s_per_tile=round(rec["seconds"] / n, 3),
                stage_s_per_tile={k: round(v / n, 4) for k, v in last.get("stage_seconds", {}).items()})


def index(args, out: Path, store: Path, normals: list[str], per_image: int, tiling: list) -> None:
    if store.exists():
        store.unlink()
    (out / "normals.txt").write_text("\n".join(normals) + "\n")
    rec = process([*SPADE, "index", out / "normals.txt", "--out", store, *tiling, *args.extra], out / "index.log")
    n = len(normals) * per_image
    emit_to(out / JSONL, bench="tiles", step="index", images=len(normals), tiles=n, tile=args.tile,
            overlap=args.overlap, size=args.size, extra=" ".join(args.extra), **rec,
            s_per_image=round(rec["seconds"] / len(normals), 2),
            s_per_tile=round(rec["seconds"] / n, 3), corpus_bytes=store.stat().st_size)


if __name__ == "__main__":
    main()
