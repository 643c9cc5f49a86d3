"""PatchCore (amazon-science/patchcore-inspection, the authors' code) on a list of normal images
and a list of test images: run in the peer's own virtual environment, never this project's
(``benchmarks/peers/setup_patchcore.sh`` makes it). Driven by ``bench_peer_patchcore.py``,
which gives it the same images and the same weights file as this project's user-run benchmark.

The paper's MVTec setting: Wide-ResNet50-2 layer2 + layer3, 3x3 patch aggregation, 1024-d
embeddings, approximate greedy coreset of 10%, 1 nearest neighbour (faiss flat L2 on CPU), a
square resize to 256 (as this project; on MVTec's square images the same as the authors'
Resize(256)), centre crop 224. Writes ``OUT/patchcore.npz`` (image scores, maps at 224x224 in
float16) and prints JSON lines: fit seconds, score seconds, peak RSS, memory bank bytes.
"""

import argparse
import json
import os
import resource
import time

import numpy as np
import patchcore.common
import patchcore.patchcore
import patchcore.sampler
import torch
import torchvision
from PIL import Image

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def emit(**record):
    print(json.dumps(record), flush=True)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Images(torch.utils.data.Dataset):
    def __init__(self, paths, resize, crop):
        self.paths = paths
        self.transform = torchvision.transforms.Compose([
            torchvision.transforms.Resize((resize, resize)), torchvision.transforms.CenterCrop(crop),
            torchvision.transforms.ToTensor(), torchvision.transforms.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = self.transform(Image.open(self.paths[i]).convert("RGB"))
        return {"image": image, "is_anomaly": 0, "mask": torch.zeros(1)}  # the keys predict() reads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-list", required=True)
    ap.add_argument("--test-list", required=True)
    ap.add_argument("--weights", required=True, help="a Wide-ResNet50-2 state_dict file (torch.save)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--coreset", type=float, default=0.1)
    ap.add_argument("--resize", type=int, default=256)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    read = lambda p: [line.strip() for line in open(p) if line.strip()]  # noqa: E731
    train, test = read(args.train_list), read(args.test_list)

    backbone = torchvision.models.wide_resnet50_2()
    backbone.load_state_dict(torch.load(args.weights, map_location="cpu"))
    backbone.name = "wideresnet50"
    device = torch.device("cpu")
    model = patchcore.patchcore.PatchCore(device)
    model.load(backbone=backbone, layers_to_extract_from=["layer2", "layer3"], device=device,
               input_shape=(3, args.crop, args.crop), pretrain_embed_dimension=1024, target_embed_dimension=1024,
               patchsize=3, featuresampler=patchcore.sampler.ApproximateGreedyCoresetSampler(args.coreset, device),
               anomaly_scorer_num_nn=1, nn_method=patchcore.common.FaissNN(False, args.threads))
    loader = lambda paths: torch.utils.data.DataLoader(Images(paths, args.resize, args.crop),  # noqa: E731
                                                      batch_size=args.batch_size, shuffle=False, num_workers=0)
    t = time.perf_counter()
    model.fit(loader(train))
    fit_s = time.perf_counter() - t
    os.makedirs(args.out, exist_ok=True)
    model.save_to_path(args.out)
    bank = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out) if f.endswith(".faiss"))
    emit(peer="patchcore", step="fit", images=len(train), seconds=round(fit_s, 2),
         s_per_image=round(fit_s / len(train), 4), memory_bank_bytes=bank,
         bank_vectors=int(model.anomaly_scorer.detection_features.shape[0])
         if getattr(model.anomaly_scorer, "detection_features", None) is not None else None,
         peak_rss_mb=round(peak_rss_mb()))
    t = time.perf_counter()
    scores, maps, _, _ = model.predict(loader(test))
    score_s = time.perf_counter() - t
    np.savez(os.path.join(args.out, "patchcore.npz"), paths=np.array(test), scores=np.array(scores, np.float64),
             maps=np.stack([np.asarray(m, np.float32) for m in maps]).astype(np.float16))
    emit(peer="patchcore", step="score", images=len(test), seconds=round(score_s, 2),
         s_per_image=round(score_s / len(test), 4), peak_rss_mb=round(peak_rss_mb()))


if __name__ == "__main__":
    main()
