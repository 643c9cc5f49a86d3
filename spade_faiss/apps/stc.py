"""The ShanghaiTech Campus protocol (STC: the SPADE paper's second setting, surveillance video):
``spade-faiss evaluate --protocol stc ROOT``.

Layout (as the dataset is distributed)::

    ROOT/training/videos/*.avi                      normal training videos
    ROOT/testing/frames/<video>/<nnn>.jpg           test frames, one folder per video
    ROOT/testing/test_frame_mask/<video>.npy        per frame: 1 anomalous, 0 normal
    ROOT/testing/test_pixel_mask/<video>.npy        per frame: the anomalous pixels (n, H, W)

The paper's protocol: frames resized to 256x256 with ``INTER_AREA`` (no crop: ``resize = crop =
256``), ``K = 1`` (``k_gallery = k_image = 1``), about 5,000 training frames (taken evenly over
all training videos' frames), every 5th test frame; frame-level ROCAUC over the frames' image
scores and pixel-level ROCAUC over every pixel of every scored frame (masks resized to 256x256
with ``INTER_NEAREST``), pooled over the whole test set. The paper reports 71.9 and 89.9.
Those protocol values are fixed here (whatever else is passed) and recorded in the results.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np

from .. import datasets, metrics
from ..detector import Spade
from ..video import list_frames
from .progress import Progress
from .runs import RunDir, run_manifest, score_into_run

PROTOCOL = {"resize": 256, "crop": 256, "k_gallery": 1, "k_image": 1}
TRAIN_FRAMES = 5000
TEST_STRIDE = 5
PAPER = {"frame_AUROC": 71.9, "pixel_AUROC": 89.9}


def layout(root) -> tuple[list[str], dict[str, dict]]:
    """(training videos, test videos ``{name: {"frames", "labels", "pixel_masks"}}``) of an STC
    root, checked: a missing part or a mask that does not match its frames is refused by name."""
    root = Path(root)
    train_dir, frames_dir = root / "training" / "videos", root / "testing" / "frames"
    labels_dir, pixels_dir = root / "testing" / "test_frame_mask", root / "testing" / "test_pixel_mask"
    for d in (train_dir, frames_dir, labels_dir, pixels_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: missing (expected the ShanghaiTech Campus layout: training/videos, "
                                    f"testing/frames, testing/test_frame_mask, testing/test_pixel_mask)")
    videos = sorted(str(train_dir / n) for n in os.listdir(train_dir) if not n.startswith("."))
    if not videos:
        raise ValueError(f"{train_dir}: no training videos")
    tests = {}
    for name in sorted(n for n in os.listdir(frames_dir) if (frames_dir / n).is_dir()):
        frames = datasets.list_folder(frames_dir / name)
        labels = np.load(labels_dir / f"{name}.npy")
        if len(labels) != len(frames):
            raise ValueError(f"{labels_dir / name}.npy: {len(labels)} frame labels for {len(frames)} frames")
        tests[name] = {"frames": frames, "labels": labels.astype(bool), "pixel_masks": pixels_dir / f"{name}.npy"}
    if not tests:
        raise ValueError(f"{frames_dir}: no test videos")
    return videos, tests


def training_frames(videos: list[str], count: int) -> list[str]:
    """About ``count`` frame references taken evenly over all training videos' frames."""
    frames = [f.path for v in videos for f in list_frames(v)]
    step = max(1, len(frames) // count)
    return frames[::step][:count]


def evaluate_stc(root, out_dir, params: dict, train_frames: int = TRAIN_FRAMES, test_stride: int = TEST_STRIDE) -> dict:
    """Index the training frames, score every ``test_stride``-th test frame into a run directory,
    measure the pooled frame- and pixel-level ROCAUC; writes ``metrics.json`` and returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    videos, tests = layout(root)
    params = {**params, **PROTOCOL}
    corpus = out / "stc.h5"
    if corpus.exists():
        corpus.unlink()
    normals = training_frames(videos, train_frames)
    chosen = [(name, i) for name, t in tests.items() for i in range(0, len(t["frames"]), test_stride)]
    paths = [tests[name]["frames"][i] for name, i in chosen]
    with Spade.create(corpus, **{k: v for k, v in params.items() if k != "fpr"}) as spade:
        with Progress(len(normals), "indexing training frames") as bar:
            spade.add(normals, on_progress=bar.update)
        run = RunDir(out / "run")
        run.open(run_manifest(spade, str(corpus), str(root), "all"), restart=True)
        writer = run.writer(spade.crop, spade.resize)
        results = {}

        def keep(r):  # the score and the map only: not the decoded frame
            results[r.path] = (r.score, r.map)

        with Progress(len(paths), "scoring test frames") as bar:
            errors = score_into_run(spade.iter_score(paths), writer, keep, on_progress=bar.update)
    if errors:
        raise ValueError(f"{len(errors)} test frames could not be scored, e.g. {errors[0]}")
    labels, scores, masks, maps = [], [], [], []
    for name in tests:
        rows = [i for n, i in chosen if n == name]
        pixel = np.load(tests[name]["pixel_masks"], mmap_mode="r")
        for i in rows:
            score, amap = results[tests[name]["frames"][i]]
            labels.append(bool(tests[name]["labels"][i]))
            scores.append(score)
            masks.append(cv2.resize(np.asarray(pixel[i], np.uint8), (PROTOCOL["crop"],) * 2,
                                    interpolation=cv2.INTER_NEAREST) > 0)
            maps.append(amap)
    report = {"protocol": "stc", **PROTOCOL, "train_frames": len(normals), "test_frames": len(paths),
              "test_stride": test_stride, "anomalous_frames": int(np.sum(labels)),
              "frame_AUROC": metrics.auroc(np.array(labels), np.array(scores)),
              "pixel_AUROC": metrics.pixel_auroc(np.stack(masks), np.stack(maps)), "paper": PAPER}
    RunDir(out).metrics.write_text(json.dumps(report, indent=2))
    return report


def table(report: dict) -> str:
    """The results beside the paper's, as Markdown."""
    return ("| ShanghaiTech Campus | frame ROCAUC | pixel ROCAUC |\n|---|---|---|\n"
            f"| SPADE (paper) | {PAPER['frame_AUROC']} | {PAPER['pixel_AUROC']} |\n"
            f"| this run ({report['train_frames']} training frames, {report['test_frames']} test frames) | "
            f"{100 * report['frame_AUROC']:.1f} | {100 * report['pixel_AUROC']:.1f} |\n")
