"""Calibration and evaluate, end to end on real files: synthetic data and a few real
magnetic_tile images per class (from ../shared/data, copied into a temporary MVTec layout)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spade_faiss import cli, evaluation, metrics
from spade_faiss.detector import Spade
from spade_faiss.images import discover

from .conftest import SMALL

MAGNETIC_TILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"
FEAT = ["--backbone", "resnet18", "--weights", "none", "--resize", "72", "--crop", "64", "--device", "cpu"]


def test_calibrate_sets_thresholds_at_the_requested_fpr(tmp_path, dataset, capsys):
    store = tmp_path / "c.h5"
    train, held = evaluation.split_train(dataset)
    assert len(held) == 1 and held[0] == discover(dataset)[9]
    with Spade.create(store, **SMALL) as s:
        s.add(train)
    assert cli.main(["calibrate", str(store), str(dataset), *FEAT, "--k-gallery", "5", "--fpr", "0.1"]) == 0
    th = json.loads(capsys.readouterr().out)
    with Spade.open(store, k_gallery=5, **SMALL) as s:
        assert s.store_.thresholds()["tau"] == th["tau"]
        r = s.score(discover(dataset))  # the calibration images themselves
    assert (r.image_scores > th["tau"]).mean() <= 0.1
    assert (r.maps > th["theta"]).mean() <= 0.1
    assert th["tau"] == metrics.threshold_at_fpr(r.image_scores, 0.1)


def small_magnetic_tile(dst: Path, n_train=10, per_class=2) -> Path:
    root = dst / "magnetic_tile"
    for p in sorted((MAGNETIC_TILE / "train" / "good").glob("*.png"))[:n_train]:
        (root / "train" / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / "train" / "good")
    for cls in sorted(d.name for d in (MAGNETIC_TILE / "test").iterdir()):
        (root / "test" / cls).mkdir(parents=True)
        for p in sorted((MAGNETIC_TILE / "test" / cls).glob("*.png"))[:per_class]:
            shutil.copy(p, root / "test" / cls)
            mask = MAGNETIC_TILE / "ground_truth" / cls / f"{p.stem}_mask.png"
            if mask.exists():
                (root / "ground_truth" / cls).mkdir(parents=True, exist_ok=True)
                shutil.copy(mask, root / "ground_truth" / cls)
    return root


@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="../shared/data/magnetic_tile is not beside the repo")
def test_evaluate_on_a_few_real_magnetic_tile_images(tmp_path, capsys):
    root = small_magnetic_tile(tmp_path)
    out = tmp_path / "eval"
    assert cli.main(["evaluate", str(root), "--out", str(out), *FEAT, "--k-gallery", "5"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    cat = report["categories"]["magnetic_tile"]
    assert cat["n_train"] == 9 and cat["n_holdout"] == 1 and cat["n_test"] == 12
    for m in evaluation.METRIC_NAMES:
        assert 0 <= cat[m] <= 1 and report["mean"][m] == cat[m]
    assert report["weights"].startswith("random-init")
    assert "test_label_derived" in cat and cat["calibrated"]["fpr"] == 0.01
    for f in ("roc.png", "pro.png", "worst_cases.png", "metrics.json", "corpus.h5"):
        assert (out / "magnetic_tile" / f).is_file(), f
    table = (out / "table.md").read_text()
    assert "| magnetic_tile |" in table and "**mean**" in table
    # Re-running reuses the corpus (nothing re-indexed) and gives the same metrics.
    assert cli.main(["evaluate", str(root), "--out", str(out), *FEAT, "--k-gallery", "5"]) == 0
    again = json.loads((out / "metrics.json").read_text())["categories"]["magnetic_tile"]
    assert {m: again[m] for m in evaluation.METRIC_NAMES} == {m: cat[m] for m in evaluation.METRIC_NAMES}


def test_evaluate_rejects_bad_roots(tmp_path):
    with pytest.raises(FileNotFoundError):
        evaluation.evaluate(tmp_path / "none", tmp_path / "out")
    with pytest.raises(ValueError, match="no MVTec-layout category"):
        evaluation.evaluate(tmp_path, tmp_path / "out")


def test_empty_masks_count_as_anomalous_images_with_no_anomalous_pixels():
    labels = np.array([0, 1, 1])
    masks = np.zeros((3, 4, 4), bool)
    masks[1, 1:3, 1:3] = True   # image 1: a region; image 2: anomalous with an empty mask
    maps = np.zeros((3, 4, 4))
    maps[1, 1:3, 1:3] = 1.0
    maps[2] = 0.5               # its pixels are normal pixels: they raise the pixel FPR
    m = metrics.evaluate(labels, np.array([0.1, 0.9, 0.8]), masks, maps)
    assert m["image_AUROC"] == 1.0 and m["pixel_AUROC"] == 1.0 and m["AUPRO"] == 1.0
