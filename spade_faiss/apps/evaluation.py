"""Paper-style evaluation of MVTec-layout datasets.

Per category: index ``train/good`` except every 10th image (sorted), calibrate the thresholds
on those held-out normal images (no anomaly label is used), score ``test/`` into a run
directory (per-image scores, maps, overlays, report), and measure. F1-optimal thresholds
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

from .. import __version__, datasets, images, metrics
from ..config import DEFAULTS
from ..detector import Spade
from . import pictures
from .pictures import colour_scale
from .progress import Progress
from .runs import RunDir, run_manifest, score_into_run

log = logging.getLogger(__name__)

HOLDOUT_EVERY = 10
METRIC_NAMES = ["image_AUROC", "pixel_AUROC", "AUPRO", "image_F1Max", "pixel_F1Max"]


def split_train(root) -> tuple[list, list]:
    """``train/good`` split into (indexed, held out for calibration): every 10th sorted image."""
    train = datasets.discover(root, "train")
    held = [s for i, s in enumerate(train) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    return [s for s in train if s not in held], held


def evaluate_category(root, out_dir, params: dict, fpr: float = DEFAULTS["fpr"], overlays: bool = True) -> dict:
    """Build or reuse the corpus of one category, calibrate, score its test split into
    ``out_dir`` (a run directory), measure; returns the category's metrics record."""
    root, out_dir = Path(root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name, timings = root.name, {}
    corpus = out_dir / "corpus.h5"
    train, held = split_train(root)
    t = time.perf_counter()
    spade = Spade.open(corpus, "a", **params).load_backbone() if corpus.exists() else Spade.create(corpus, **params)
    with spade:
        with Progress(len(train), f"{name}: indexing") as bar:
            spade.add(train, on_progress=bar.update)
        timings["index_s"] = time.perf_counter() - t
        t = time.perf_counter()
        th = None
        if held:
            with Progress(len(held), f"{name}: calibrating") as bar:
                th = spade.calibrate(held, fpr, on_progress=bar.update)
        timings["calibrate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        test = datasets.discover(root, "test")
        run = RunDir(out_dir).open(run_manifest(spade, corpus, root / "test", "all"), restart=True)
        scale = colour_scale(spade)
        writer = run.writer(spade.crop, spade.resize, colour_max=scale if overlays else None, theta=spade.theta_)
        results = []
        with Progress(len(test), f"{name}: scoring") as bar:
            score_into_run(spade.iter_score(test, maps=True), writer, results.append, on_progress=bar.update)
        timings["score_s"] = time.perf_counter() - t
        ok = [r for r in results if r.error is None]
        labels = np.array([r.sample.label for r in ok])
        scores = np.array([r.score for r in ok])
        maps = np.stack([r.map for r in ok])
        masks = np.stack([images.load_mask(r.sample.mask, r.image.size, spade.resize, spade.crop) for r in ok])
        result = metrics.evaluate(labels, scores, masks, maps)
        result["test_label_derived"] = {"note": "F1-optimal thresholds from test labels; reporting only",
                                        "tau_f1": metrics.f1_max(labels, scores)[1],
                                        "theta_f1": metrics.f1_max(masks, maps)[1]}
        if th:
            pred = scores > th["tau"]
            result["calibrated"] = {"tau": th["tau"], "theta": th["theta"], "fpr": fpr,
                                    "image_precision": _ratio((pred & (labels == 1)).sum(), pred.sum()),
                                    "image_recall": _ratio((pred & (labels == 1)).sum(), (labels == 1).sum())}
        result.update(config=json.loads(spade.config_.to_json()), n_train=len(train), n_holdout=len(held),
                      n_test=len(ok), errors=[r.error for r in results if r.error],
                      empty_mask_anomalies=int(sum(1 for r, m in zip(ok, masks) if r.sample.label and not m.any())),
                      timings={k: round(v, 2) for k, v in timings.items()})
        _pictures(run, spade, ok, labels, scores, maps, masks, result, scale)
    run.metrics.write_text(json.dumps(result, indent=2))
    from .report import write_report
    write_report(out_dir)
    return result


def _ratio(a, b) -> float | None:
    return float(a / b) if b else None


def _pictures(run: RunDir, spade, ok, labels, scores, maps, masks, result, scale, n_worst: int = 6):
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    pfpr, ptpr, _ = metrics.roc_curve(masks, maps)
    pictures.curve_png(run.plot("roc"), {f"image (AUROC {result['image_AUROC']:.3f})": (fpr, tpr),
                                             f"pixel (AUROC {result['pixel_AUROC']:.3f})": (pfpr, ptpr)},
                       "false positive rate", "true positive rate", "ROC")
    if masks.any():
        x, y = metrics.pro_curve(masks, maps)
        pictures.curve_png(run.plot("pro"), {f"PRO (AU-PRO {result['AUPRO']:.3f})": (x, y)},
                           "false positive rate", "per-region overlap", "PRO up to FPR 0.3", xmax=metrics.PRO_MAX_FPR)
    # Worst: anomalies with the lowest scores, then normals with the highest.
    anomalous = [i for i in np.argsort(scores) if labels[i] == 1][: n_worst // 2]
    normal = [i for i in np.argsort(-scores) if labels[i] == 0][: n_worst - len(anomalous)]
    rows = []
    for i in anomalous + normal:
        r = ok[i]
        neighbour = images.load_image(r.neighbour_paths[0]).rgb
        rows.append({"image": images.crop_view(r.image.rgb, spade.resize, spade.crop),
                     "neighbour": images.crop_view(neighbour, spade.resize, spade.crop),
                     "map": maps[i], "mask": masks[i],
                     "title": f"{'anomalous' if labels[i] else 'normal'} score={scores[i]:.4g} "
                              f"{Path(r.path).parent.name}/{Path(r.path).name}"})
    pictures.worst_cases_png(run.plot("worst_cases"), rows, scale, spade.theta_)


def evaluate(dataset_root, out_dir, categories=None, params=None, fpr: float = DEFAULTS["fpr"],
             overlays: bool = True) -> dict:
    """Evaluate every MVTec-layout category under ``dataset_root`` (or the root itself when it
    is one category); writes ``metrics.json`` and ``table.md`` into ``out_dir``."""
    root, out_dir = Path(dataset_root), Path(out_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset folder")
    found = {root.name: root} if datasets.is_mvtec_category(root) else datasets.mvtec_categories(root)
    if categories:
        missing = sorted(set(categories) - set(found))
        if missing:
            raise ValueError(f"{root}: no category {missing}; found {sorted(found)}")
        found = {c: found[c] for c in categories}
    if not found:
        raise ValueError(f"{root}: no MVTec-layout category (expected <category>/train/good)")
    params = dict(params or {})
    metrics.check_fpr(fpr)
    Spade(**params).validate_params()  # before any category is built
    per = {name: evaluate_category(path, out_dir / name, params, fpr, overlays) for name, path in found.items()}
    mean = {m: float(np.mean([per[c][m] for c in per])) for m in METRIC_NAMES}
    config = next(iter(per.values()))["config"]
    weights = params.get("weights", "imagenet")
    report = {"categories": per, "mean": mean, "config": config,
              "weights": "random-init (seeded; not ImageNet)" if weights is None else str(weights),
              "versions": _versions(), "calibration": f"every {HOLDOUT_EVERY}th train/good image held out, "
                                                      f"thresholds at FPR {fpr}"}
    run = RunDir(out_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    run.metrics.write_text(json.dumps(report, indent=2))
    run.table.write_text(markdown_table(per, mean, report["weights"]))
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
