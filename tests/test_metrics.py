"""Metrics equal hand-computed answers and independent formulas."""

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from spade_faiss import metrics


def test_auroc_hand_computed_and_ties():
    assert metrics.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert metrics.auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert metrics.auroc([0, 1], [0.2, 0.2]) == 0.5


def test_auroc_equals_mann_whitney(rng):
    labels = rng.random(500) < 0.3
    scores = np.round(rng.standard_normal(500) + labels, 1)  # many ties
    u = mannwhitneyu(scores[labels], scores[~labels]).statistic
    assert metrics.auroc(labels, scores) == pytest.approx(u / (labels.sum() * (~labels).sum()), abs=1e-12)


def test_roc_curve_area_equals_auroc(rng):
    labels = rng.random(200) < 0.5
    scores = np.round(rng.random(200), 1)  # ties: the curve's diagonal steps give them 1/2
    fpr, tpr, thr = metrics.roc_curve(labels, scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1) and np.all(np.diff(thr) < 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.auroc(labels, scores), abs=1e-12)


def test_f1_max_hand_computed():
    f1, t = metrics.f1_max([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    assert f1 == pytest.approx(0.8) and t == 0.7


def hand_case():
    masks = np.zeros((1, 3, 4), bool)
    maps = np.full((1, 3, 4), 0.1)
    masks[0, 0, 0] = True                 # region 1: one pixel
    masks[0, 2, 2:4] = True               # region 2: two pixels
    maps[0, 0, 0], maps[0, 2, 2], maps[0, 2, 3] = 0.9, 0.8, 0.2
    maps[0, 1, 1] = 0.7                   # one bright normal pixel
    return masks, maps


def test_pro_hand_computed():
    masks, maps = hand_case()
    # thresholds 0.9: PRO .5, FPR 0; 0.8: PRO .75; 0.7: FPR 1/9; 0.2: PRO 1; 0.1: FPR 1
    fpr, pro = metrics.pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 9, 1 / 9, 0.3])
    np.testing.assert_allclose(pro, [0, 0.5, 0.75, 0.75, 1.0, 1.0])
    assert metrics.au_pro(masks, maps) == pytest.approx((0.75 / 9 + (0.3 - 1 / 9)) / 0.3)


def test_regions_are_8_connected_and_across_images():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal: one region of 2 pixels
    masks[1, 3, 3] = True                   # a second region in another image
    maps = np.zeros((2, 4, 4))
    maps[0, 0, 0] = 1.0                     # half of region 1 found at FPR 0
    # PRO at FPR 0 = (0.5 + 0) / 2 regions; everything else ties at 0 (FPR jumps to 1).
    fpr, pro = metrics.pro_curve(masks, maps)
    np.testing.assert_allclose(pro[:2], [0, 0.25])
    # Linear interpolation from (0, .25) to (1, 1): at 0.3 PRO = .475; area = (.25 + .475)/2 * .3
    assert metrics.au_pro(masks, maps) == pytest.approx((0.25 + 0.475) / 2)


def test_pro_is_invariant_to_monotone_transforms_and_perfect_is_one(rng):
    masks = np.zeros((5, 32, 32), bool)
    for i in range(4):
        y, x = rng.integers(0, 28, 2)
        masks[i, y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = True
    maps = rng.random(masks.shape) + masks * rng.random(masks.shape)
    a = metrics.au_pro(masks, maps)
    assert metrics.au_pro(masks, np.exp(3 * maps) + 7) == pytest.approx(a, abs=1e-12)
    assert metrics.au_pro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert metrics.pixel_auroc(masks, masks.astype(float)) == 1.0
    assert 0 < a < 1


def test_threshold_at_fpr():
    s = np.arange(1, 101, dtype=float)
    t = metrics.threshold_at_fpr(s, 0.01)
    assert t == 99 and (s > t).mean() <= 0.01
    assert metrics.threshold_at_fpr(s, 0.0) == 100


@pytest.mark.parametrize("call, match", [
    (lambda: metrics.auroc([1, 1], [0.1, 0.2]), "only anomalous"),
    (lambda: metrics.auroc([0, 0], [0.1, 0.2]), "only normal"),
    (lambda: metrics.auroc([], []), "no samples"),
    (lambda: metrics.auroc([0, 1], [0.1, np.nan]), "nan"),
    (lambda: metrics.pixel_auroc(np.zeros((1, 4, 4)), np.zeros((1, 4, 5))), "differ in shape"),
    (lambda: metrics.au_pro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4))), "no anomalous region"),
    (lambda: metrics.threshold_at_fpr([], 0.01), "no normal scores"),
])
def test_degenerate_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_evaluate_names():
    masks, maps = hand_case()
    m = metrics.evaluate([0, 1], [0.1, 0.9], np.concatenate([np.zeros_like(masks), masks]),
                         np.concatenate([maps * 0, maps]))
    assert set(m) == {"image_AUROC", "image_F1Max", "pixel_AUROC", "pixel_F1Max", "AUPRO"}
    assert m["image_AUROC"] == 1.0
