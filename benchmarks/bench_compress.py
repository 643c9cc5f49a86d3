"""What each stored representation costs and changes, on a user's own corpus and images.

The corpus is converted into each candidate representation (``spade-faiss convert``), then
every held-out image goes through the backbone and stage 1 once (the pooled vectors, hence the
image scores and the retrieved images, are the same in every representation) and through stage
2 once per representation. Reported per representation, as JSON lines: bytes per image (per
level), stage-2 and gallery-read seconds per image, the maps' relative difference from the
corpus's own representation (the reference: a float32 corpus for the truest comparison), their
Spearman correlation, the range over images of each map's maximum over the reference's (a
location decoded far from its feature shows there), and with an MVTec category's ``test/``
(masks): pixel AUROC, AU-PRO and image AUROC.

    spade-faiss bench compress CORPUS HELD_OUT            # or:
    python benchmarks/bench_compress.py --corpus indexes/tile.h5 --held-out DATA/tile --out DIR

The reference for this project's numbers: a float32 corpus of the first 100 magnetic_tile
normals (``--build-reference 100``, random-init Wide-ResNet50-2) and the full test set.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import DATA, emit, machine, peak_rss_mb, real_images
from scipy.stats import spearmanr

from spade_faiss import datasets, images, metrics
from spade_faiss.detector import Spade, convert

CANDIDATES = ("float16", "float16+zstd", "compact", "pca32", "pca64", "pca128")
SPEARMAN_PIXELS = 1_000_000


def build_reference(out: Path, n: int) -> Path:
    path = out / f"reference_float32_{n}.h5"
    if not path.exists():
        with Spade.create(path, storage="float32", weights=None, device="cpu") as spade:
            spade.add(real_images("train", n))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", help="the corpus to compare against (its own representation is the reference)")
    ap.add_argument("--build-reference", type=int, metavar="N",
                    help="instead: a float32 corpus of the first N magnetic_tile normals (random-init weights)")
    ap.add_argument("--held-out", default=str(DATA), help="held-out images: a folder, a list file or an MVTec "
                                                         "category (its test/ split, with masks)")
    ap.add_argument("--storages", default=";".join(CANDIDATES), help="representations to try, separated by ';'")
    ap.add_argument("--k-gallery", type=int, default=50)
    ap.add_argument("--limit", type=int, help="only the first N held-out images")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus) if args.corpus else build_reference(out, args.build_reference or 100)
    samples = datasets.discover(args.held_out, split="test")
    if args.limit:  # evenly spaced, so that every defect class and the good images are in
        samples = samples[:: max(1, len(samples) // args.limit)][: args.limit]
    emit(bench="compress", machine=machine(), corpus=str(corpus), held_out=args.held_out, images=len(samples))

    spades = {"reference": Spade.open(corpus, k_gallery=args.k_gallery, device="cpu").load_backbone()}
    for name in args.storages.split(";"):
        path = out / f"converted_{name.replace('=', '-').replace(',', '_').replace('+', 'p')}.h5"
        path.unlink(missing_ok=True)
        t = time.perf_counter()
        convert(corpus, path, name)
        seconds = time.perf_counter() - t
        spades[name] = Spade.open(path, k_gallery=args.k_gallery, device="cpu")
        spades[name].extractor_ = spades["reference"].extractor_  # the same weights: one model in memory
        emit(bench="compress", storage=name, convert_s=round(seconds, 2))

    maps = {name: [] for name in spades}
    labels, scores, masks = [], [], []
    ref = spades["reference"]
    for batch in ref._batches(samples):
        ok = [p for p in batch if p.error is None]
        retrieved = ref.retrieve(ok)
        for name, spade in spades.items():
            spade.segment(retrieved)
            maps[name] += [r.map for r in retrieved]
        for r in retrieved:
            s = r.prepared.sample
            labels.append(getattr(s, "label", None))
            scores.append(r.score)
            mask = getattr(s, "mask", None)
            masks.append(images.load_mask(mask, r.prepared.image.size, ref.resize, ref.crop)
                         if getattr(s, "label", None) is not None else None)
    n = len(scores)
    has_masks = n and all(label is not None for label in labels) and len(set(labels)) == 2
    ref_maps = np.stack(maps["reference"])
    rng = np.random.default_rng(0)
    pick = rng.choice(ref_maps.size, min(SPEARMAN_PIXELS, ref_maps.size), replace=False)
    for name, spade in spades.items():
        m = np.stack(maps[name])
        rel = np.abs(m - ref_maps) / np.maximum(np.abs(ref_maps), 1e-12)
        per_image = [spearmanr(a.ravel(), b.ravel())[0] for a, b in zip(m, ref_maps)]
        peak_ratio = m.reshape(len(m), -1).max(1) / np.maximum(ref_maps.reshape(len(m), -1).max(1), 1e-12)
        record = dict(bench="compress", storage=name if name != "reference" else spade.config_.storage,
                      reference=name == "reference", images=n,
                      bytes_per_image=spade.info()["bytes_per_image"],
                      stage2_s_per_image=round(spade.timings_["stage2"] / n, 4),
                      gallery_io_s_per_image=round(spade.timings_["gallery_io"] / n, 4),
                      mb_read_per_image=round(spade.bytes_read_ / n / 1e6, 3),
                      max_rel_map_diff=float(rel.max()), median_rel_map_diff=float(np.median(rel)),
                      spearman_pooled=float(spearmanr(m.ravel()[pick], ref_maps.ravel()[pick])[0]),
                      spearman_per_image_min=float(np.min(per_image)),
                      spearman_per_image_median=float(np.median(per_image)),
                      map_max_ratio_min=float(peak_ratio.min()), map_max_ratio_max=float(peak_ratio.max()))
        if has_masks:
            gt = np.stack(masks)
            record.update(pixel_auroc=metrics.pixel_auroc(gt, m), au_pro=metrics.au_pro(gt, m),
                          image_auroc=metrics.auroc(np.array(labels), np.array(scores)))
        emit(**record)
    emit(bench="compress", peak_rss_mb=round(peak_rss_mb()))
    for spade in spades.values():
        spade.close()


if __name__ == "__main__":
    main()
