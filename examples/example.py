"""The built-in example: generate a small synthetic category, index it, score its test set.

Uses ImageNet weights when they can be obtained (torch hub cache, or a download); otherwise it
says so in a banner and continues with seeded random-init weights. (The library itself never
falls back: this choice is the example's.)
"""

import argparse
import json
import socket
import sys
from pathlib import Path

from spade_faiss.apps import cli
from spade_faiss.backbone import WeightsError, imagenet_cache_path, load_state_dict
from spade_faiss.synthetic import make_dataset


def choose_weights(backbone: str) -> str:
    socket.setdefaulttimeout(20)  # an offline machine should not hang on the download
    try:
        load_state_dict(backbone, "imagenet")
        return "imagenet"
    except WeightsError as e:
        bar = "=" * 78
        print(f"{bar}\nIMAGENET WEIGHTS UNAVAILABLE: using seeded RANDOM-INIT weights instead.\n{e}\n"
              f"Scores below are NOT representative of ImageNet features. To use them, put the file at\n"
              f"{imagenet_cache_path(backbone)}\n{bar}", file=sys.stderr)
        return "none"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"))
    ap.add_argument("--backbone", default="wide_resnet50_2")
    args = ap.parse_args()
    out = Path(args.out)
    data = make_dataset(out / "data" / "tile", n_train=20, n_good=4, n_defect=6, size=(128, 128), seed=0)
    weights = choose_weights(args.backbone)
    common = ["--backbone", args.backbone, "--weights", weights]
    store = out / "tile.h5"
    code = cli.main(["index", str(data), "--out", str(store), *common])
    if code:
        return code
    code = cli.main(["score", str(store), str(data), "--out", str(out / "run"), "--k-gallery", "10", "--restart"])
    if code:
        return code
    print(json.dumps({"corpus": str(store), "scores": str(out / "run" / "scores.csv"),
                      "maps": str(out / "run" / "maps.h5"), "overlays": str(out / "run" / "overlays"),
                      "report": str(out / "run" / "report.html")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
