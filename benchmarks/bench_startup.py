"""Start-up as users meet it: a one-image ``spade-faiss score`` process end to end, and a
``spade-faiss serve`` process from launch to its first healthy answer, with a Wide-ResNet50-2
weights file (a state_dict saved from a seeded random-init model: ImageNet weights cannot be
downloaded here, and loading them costs the same). Each measured ``--repeats`` times, warm
page cache; prints JSON lines.

    python benchmarks/bench_startup.py --out /tmp/startup [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine, real_images  # noqa: E402


def weights_file(folder: Path) -> Path:
    path = folder / "wrn50_2.pt"
    if not path.exists():
        import torch
        import torchvision

        torch.manual_seed(0)
        torch.save(torchvision.models.wide_resnet50_2().state_dict(), path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_score(corpus: Path, image: str, out: Path) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spade_faiss", "score", str(corpus), image, "--out", str(out),
                    "--restart", "--no-report"], check=True, capture_output=True)
    return time.perf_counter() - t


def time_serve(corpus: Path) -> float:
    port = free_port()
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "spade_faiss", "serve", str(corpus), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(proc.stderr.read().decode()) from None
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for the weights file, corpus and runs (default: a new one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=20, help="normal images in the corpus")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="spade-startup-"))
    out.mkdir(parents=True, exist_ok=True)
    weights = weights_file(out)
    corpus = out / "corpus.h5"
    if not corpus.exists():
        listing = out / "normals.txt"
        listing.write_text("\n".join(real_images("train", args.images)) + "\n")
        subprocess.run([sys.executable, "-m", "spade_faiss", "index", str(listing), "--out", str(corpus),
                        "--weights", str(weights)], check=True, capture_output=True)
    image = real_images("test", 1)[0]
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import spade_faiss.apps.cli"], check=True)
    import_s = time.perf_counter() - t
    score = [time_score(corpus, image, out / "run") for _ in range(args.repeats)]
    serve = [time_serve(corpus) for _ in range(args.repeats)]
    emit(bench="startup", import_cli_s=round(import_s, 2), score_one_image_s=[round(x, 2) for x in score],
         serve_healthy_s=[round(x, 2) for x in serve], weights=str(weights.name), corpus_images=args.images,
         machine=machine(), environ={k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE",)})
    print(json.dumps({"out": str(out)}), file=sys.stderr)


if __name__ == "__main__":
    main()
