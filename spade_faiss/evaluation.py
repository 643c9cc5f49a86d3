"""Calibration and paper-style evaluation over MVTec-layout datasets.

Thresholds come from normal images only (``calibrate``): tau and theta are set at a false
positive rate over held-out normal images and their pixels. ``evaluate`` holds out every 10th
``train/good`` image (sorted) for that calibration and indexes the rest; F1-optimal thresholds
derived from test labels are reported separately, clearly named, and never used as defaults.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

from . import __version__, metrics, plots
from . import images as imglib
from .detector import Spade

log = logging.getLogger(__name__)

HOLDOUT_EVERY = 10
METRIC_NAMES = ["image_AUROC", "pixel_AUROC", "AUPRO", "image_F1Max", "pixel_F1Max"]


def score_all(spade: Spade, samples, on_batch=None):
    """Score samples in batches; returns (ok samples, image scores, maps, nearest ids, errors)."""
    ok, scores, maps, nearest, errors = [], [], [], [], []
    for batch in imglib.iter_prepared(samples, spade.batch_size, spade.resize, spade.crop, spade.workers):
        r = spade.score_prepared(batch)
        good = [p for p in batch if p.error is None]
        ok += good
        scores.append(r.image_scores)
        if r.maps is not None:
            maps.append(r.maps)
        nearest.append(r.neighbour_ids[:, 0])
        errors += r.errors
        if on_batch:
            on_batch(len(batch))
    return (ok, _concat(scores, (0,)), _concat(maps, (0, spade.crop, spade.crop)),
            _concat(nearest, (0,), np.int64), errors)


def _concat(parts, empty_shape, dtype=np.float32):
    return np.concatenate(parts) if parts else np.zeros(empty_shape, dtype)


def calibrate(spade: Spade, normal_samples, fpr: float = 0.01, on_batch=None) -> dict:
    """Thresholds at ``fpr`` over normal images (tau) and their pixels (theta); stored in the
    corpus file (it must be open for append) and returned."""
    ok, scores, maps, _, errors = score_all(spade, normal_samples, on_batch)
    if not ok:
        raise ValueError("calibrate: none of the normal images could be scored")
    th = {"tau": metrics.threshold_at_fpr(scores, fpr), "theta": metrics.threshold_at_fpr(maps, fpr),
          "fpr": fpr, "n_images": len(ok),
          "scoring": {k: getattr(spade, k) for k in ("k_image", "k_gallery", "kappa", "pixel_mode", "sigma")}}
    spade.store_.write_thresholds(th)
    for _, reason in errors:
        log.warning("calibration skipped %s", reason)
    return th


def split_train(root) -> tuple[list, list]:
    """``train/good`` split into (indexed, held out for calibration): every 10th sorted image."""
    train = imglib.discover(root, "train")
    held = [s for i, s in enumerate(train) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    return [s for s in train if s not in held], held


def evaluate_category(root, out_dir, params: dict, fpr: float = 0.01, progress=None) -> dict:
    """Build or reuse the corpus of one category, calibrate, score its test split, measure."""
    root, out_dir = Path(root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = {}
    t = time.perf_counter()
    corpus = out_dir / "corpus.h5"
    train, held = split_train(root)
    spade = Spade.open(corpus, "a", **params) if corpus.exists() else Spade.create(corpus, **params)
    with spade:
        spade.add(train, on_batch=progress)
        timings["index_s"] = time.perf_counter() - t
        t = time.perf_counter()
        th = calibrate(spade, held, fpr, on_batch=progress) if held else None
        timings["calibrate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        test = imglib.discover(root, "test")
        ok, scores, maps, nearest, errors = score_all(spade, test, progress)
        timings["score_s"] = time.perf_counter() - t
        labels = np.array([s.sample.label for s in ok])
        masks = np.stack([imglib.load_mask(s.sample.mask, s.image.size, spade.resize, spade.crop) for s in ok])
        result = metrics.evaluate(labels, scores, masks, maps)
        f1_img = metrics.f1_max(labels, scores)
        f1_pix = metrics.f1_max(masks, maps)
        result["test_label_derived"] = {"note": "F1-optimal thresholds from test labels; reporting only",
                                        "tau_f1": f1_img[1], "theta_f1": f1_pix[1]}
        if th:
            pred = scores > th["tau"]
            result["calibrated"] = {"tau": th["tau"], "theta": th["theta"], "fpr": fpr,
                                    "image_precision": _ratio((pred & (labels == 1)).sum(), pred.sum()),
                                    "image_recall": _ratio((pred & (labels == 1)).sum(), (labels == 1).sum())}
        result.update(config=json.loads(spade.config_.to_json()),
                      n_train=len(train), n_holdout=len(held), n_test=len(ok), errors=[r for _, r in errors],
                      empty_mask_anomalies=int(sum(1 for s, m in zip(ok, masks) if s.sample.label and not m.any())),
                      timings={k: round(v, 2) for k, v in timings.items()})
        _pictures(out_dir, spade, ok, labels, scores, maps, masks, nearest, th)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def _ratio(a, b) -> float | None:
    return float(a / b) if b else None


def _pictures(out_dir, spade, ok, labels, scores, maps, masks, nearest, th, n_worst: int = 6):
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    pfpr, ptpr, _ = metrics.roc_curve(masks, maps)
    plots.curve_png(out_dir / "roc.png", {"image": (fpr, tpr), "pixel": (pfpr, ptpr)},
                    "false positive rate", "true positive rate", "ROC")
    if masks.any():
        x, y = metrics.pro_curve(masks, maps)
        plots.curve_png(out_dir / "pro.png", {"PRO": (x, y)}, "false positive rate", "per-region overlap",
                        "PRO up to FPR 0.3", xmax=metrics.PRO_MAX_FPR)
    # Worst: anomalies with the lowest scores, then normals with the highest.
    anomalous = [i for i in np.argsort(scores) if labels[i] == 1][: n_worst // 2]
    normal = [i for i in np.argsort(-scores) if labels[i] == 0][: n_worst - len(anomalous)]
    paths = spade.store_.paths()
    rows = []
    for i in anomalous + normal:
        neighbour = imglib.load_image(paths[int(nearest[i])]).rgb
        rows.append({"image": imglib.crop_view(ok[i].image.rgb, spade.resize, spade.crop),
                     "neighbour": imglib.crop_view(neighbour, spade.resize, spade.crop),
                     "map": maps[i], "mask": masks[i],
                     "title": f"{'anomalous' if labels[i] else 'normal'} score={scores[i]:.4g} "
                              f"{Path(ok[i].image.path).parent.name}/{Path(ok[i].image.path).name}"})
    plots.worst_cases_png(out_dir / "worst_cases.png", rows, th["theta"] if th else None)


def evaluate(dataset_root, out_dir, categories=None, params=None, fpr: float = 0.01, progress=None) -> dict:
    """Evaluate every MVTec-layout category under ``dataset_root`` (or the root itself when it
    is one category); writes ``metrics.json`` and ``table.md`` into ``out_dir``."""
    root, out_dir = Path(dataset_root), Path(out_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset folder")
    if imglib.is_mvtec_category(root):
        found = {root.name: root}
    else:
        found = {d.name: d for d in sorted(root.iterdir()) if imglib.is_mvtec_category(d)}
    if categories:
        missing = sorted(set(categories) - set(found))
        if missing:
            raise ValueError(f"{root}: no category {missing}; found {sorted(found)}")
        found = {c: found[c] for c in categories}
    if not found:
        raise ValueError(f"{root}: no MVTec-layout category (expected <category>/train/good)")
    params = dict(params or {})
    per = {name: evaluate_category(path, out_dir / name, params, fpr, progress) for name, path in found.items()}
    mean = {m: float(np.mean([per[c][m] for c in per])) for m in METRIC_NAMES}
    config = next(iter(per.values()))["config"]
    weights = params.get("weights", "imagenet")
    report = {"categories": per, "mean": mean, "config": config,
              "weights": "random-init (seeded; not ImageNet)" if weights is None else str(weights),
              "versions": _versions(), "calibration": f"every {HOLDOUT_EVERY}th train/good image held out, "
                                                      f"thresholds at FPR {fpr}"}
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    (out_dir / "table.md").write_text(markdown_table(per, mean, report["weights"]))
    return report


def markdown_table(per: dict, mean: dict, weights: str) -> str:
    """Paper-shaped table (categories + mean), percentages."""
    head = "| category | image ROCAUC | pixel ROCAUC | PRO | image F1-max | pixel F1-max |\n|---|---|---|---|---|---|\n"
    rows = "".join(f"| {c} | " + " | ".join(f"{100 * v[m]:.1f}" for m in METRIC_NAMES) + " |\n"
                   for c, v in per.items())
    rows += "| **mean** | " + " | ".join(f"**{100 * mean[m]:.1f}**" for m in METRIC_NAMES) + " |\n"
    return f"Weights: {weights}\n\n" + head + rows


def _versions() -> dict:
    import faiss
    import h5py
    import torch
    import torchvision
    return {"spade_faiss": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "faiss": faiss.__version__, "h5py": h5py.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "host": os.uname().nodename}
