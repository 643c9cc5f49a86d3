"""Calibration and evaluate, end to end on real files: synthetic data and a few real
magnetic_tile images per class (from ../shared/data, copied into a temporary MVTec layout)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spade_faiss import metrics
from spade_faiss.apps import cli, evaluation
from spade_faiss.apps.runs import RunDir
from spade_faiss.datasets import discover
from spade_faiss.detector import Spade

from .conftest import FEAT, RUN, SMALL

MAGNETIC_TILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"


def test_calibrate_sets_thresholds_at_the_requested_fpr(tmp_path, dataset, capsys):
    store = tmp_path / "c.h5"
    train, held = evaluation.split_train(dataset)
    assert len(held) == 1 and held[0] == discover(dataset)[9]
    with Spade.create(store, **SMALL) as s:
        s.add(train)
    held_dir = tmp_path / "held"
    held_dir.mkdir()
    shutil.copy(held[0].path, held_dir)
    assert cli.main(["calibrate", str(store), str(held_dir), *RUN, "--k-gallery", "5", "--fpr", "0.1"]) == 0
    th = json.loads(capsys.readouterr().out)
    with Spade.open(store, k_gallery=5) as s:
        assert (s.tau_, s.theta_) == (th["tau"], th["theta"]) and s.calibration_["n_images"] == 1
        r = s.score(held)  # the calibration images themselves
    assert (r.image_scores > th["tau"]).mean() <= 0.1
    assert (r.maps > th["theta"]).mean() <= 0.1
    assert th["tau"] == metrics.threshold_at_fpr(r.image_scores, 0.1)


def small_magnetic_tile(dst: Path, n_train=10, per_class=2, name="magnetic_tile", offset=0) -> Path:
    root = dst / name
    for p in sorted((MAGNETIC_TILE / "train" / "good").glob("*.png"))[offset:offset + n_train]:
        (root / "train" / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / "train" / "good")
    for cls in sorted(d.name for d in (MAGNETIC_TILE / "test").iterdir()):
        (root / "test" / cls).mkdir(parents=True)
        for p in sorted((MAGNETIC_TILE / "test" / cls).glob("*.png"))[offset:offset + per_class]:
            shutil.copy(p, root / "test" / cls)
            mask = MAGNETIC_TILE / "ground_truth" / cls / f"{p.stem}_mask.png"
            if mask.exists():
                (root / "ground_truth" / cls).mkdir(parents=True, exist_ok=True)
                shutil.copy(mask, root / "ground_truth" / cls)
    return root


@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="../shared/data/magnetic_tile is not beside the repo")
def test_evaluate_on_a_few_real_magnetic_tile_images(tmp_path, capsys):
    data = tmp_path / "data"
    small_magnetic_tile(data, name="tiles_a")
    small_magnetic_tile(data, name="tiles_b", offset=10)
    out = tmp_path / "eval"
    assert cli.main(["evaluate", str(data), "--out", str(out), *FEAT, "--k-gallery", "5"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    cats = report["categories"]
    assert sorted(cats) == ["tiles_a", "tiles_b"]
    for cat in cats.values():
        assert cat["n_train"] == 9 and cat["n_holdout"] == 1 and cat["n_test"] == 12
        assert "test_label_derived" in cat and cat["calibrated"]["fpr"] == 0.01
    for m in evaluation.METRIC_NAMES:
        assert 0 <= cats["tiles_a"][m] <= 1
        assert report["mean"][m] == pytest.approx((cats["tiles_a"][m] + cats["tiles_b"][m]) / 2)
    assert cats["tiles_a"]["image_AUROC"] != cats["tiles_b"]["image_AUROC"]  # two categories, two answers
    assert report["weights"].startswith("random-init")
    for f in ("roc.png", "pro.png", "worst_cases.png", "metrics.json", "corpus.h5", "scores.csv", "maps.h5",
              "report.html", "run.json"):
        assert (out / "tiles_a" / f).is_file(), f
    rows = RunDir(out / "tiles_a").score_rows()  # per-image scores and overlays
    assert len(rows) == 12 and all((out / "tiles_a" / r["overlay"]).is_file() for r in rows)
    table = (out / "table.md").read_text()
    assert "| tiles_a |" in table and "**mean**" in table
    # Re-running reuses the corpora (nothing re-indexed) and gives the same metrics.
    assert cli.main(["evaluate", str(data), "--out", str(out), *FEAT, "--k-gallery", "5",
                     "--categories", "tiles_a"]) == 0
    again = json.loads((out / "metrics.json").read_text())["categories"]["tiles_a"]
    assert {m: again[m] for m in evaluation.METRIC_NAMES} == {m: cats["tiles_a"][m] for m in evaluation.METRIC_NAMES}


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
