"""Spade equals a brute-force SPADE written from SPEC 1.1 (torch cdist over the full retrieved
galleries, float64), and finds seeded synthetic defects."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from spade_faiss import images
from spade_faiss.detector import Spade
from spade_faiss.store import StoreError

from .conftest import SMALL

MIN_SYNTHETIC_AUROC = 0.95


def oracle(spade, query_paths, k_image, k_gallery, kappa, mode, sigma):
    """SPADE from the contract: exact stage 1 with (distance, id) ordering, exact stage 2."""
    store = spade.store_
    q = spade.extractor_(np.stack([images.preprocess(images.load_image(p).rgb, spade.resize, spade.crop)
                                   for p in query_paths]))
    pool = torch.from_numpy(store.pool()).double()
    d_img = (torch.cdist(torch.from_numpy(q["pool"]).double(), pool) ** 2).numpy()
    ids = np.array([np.lexsort((np.arange(len(row)), row))[:k_gallery] for row in d_img])
    dists = np.take_along_axis(d_img, ids, 1)
    scores = dists[:, :k_image].mean(1)
    levels = spade.config_.levels
    maps = []
    for i in range(len(query_paths)):
        feats = {lv: torch.from_numpy(q[lv][i]).double() for lv in levels}
        gal = {lv: torch.from_numpy(store.level(lv, ids[i]).astype(np.float64)) for lv in levels}
        if mode == "concat":
            def up(t, size):
                return F.interpolate(t.permute(0, 3, 1, 2), size=size, mode="bilinear",
                                     align_corners=False).permute(0, 2, 3, 1)
            s = feats["layer1"].shape[:2]
            feats = {"c": torch.cat([up(feats[lv][None], s)[0] for lv in levels], -1)}
            gal = {"c": torch.cat([up(gal[lv], s) for lv in levels], -1)}
        level_maps = []
        for name, f in feats.items():
            h, w, c = f.shape
            d = torch.cdist(f.reshape(-1, c), gal[name].reshape(-1, c)) ** 2
            m = d.topk(kappa, dim=1, largest=False).values.mean(1).reshape(1, 1, h, w)
            level_maps.append(F.interpolate(m, size=(spade.crop, spade.crop), mode="bilinear",
                                            align_corners=False)[0, 0].numpy())
        maps.append(gaussian_filter(np.mean(level_maps, axis=0), sigma))
    return scores, np.array(maps), ids, dists


@pytest.fixture(scope="module")
def fitted(dataset):
    train = [s.path for s in images.discover(dataset)]
    return Spade(dtype="float32", k_gallery=6, k_image=3, **SMALL).fit(train)


@pytest.mark.parametrize("mode, kappa", [("per_level", 1), ("per_level", 3), ("concat", 1), ("concat", 3)])
def test_equals_brute_force_oracle(fitted, dataset, mode, kappa):
    fitted.pixel_mode, fitted.kappa = mode, kappa
    fitted.chunk_bytes = 200_000  # several chunks per gallery: exercises the exact merge
    queries = [s.path for s in images.discover(dataset, "test")]
    r = fitted.score(queries)
    s, m, ids, d = oracle(fitted, queries, 3, 6, kappa, mode, 4.0)
    np.testing.assert_array_equal(r.neighbour_ids, ids)
    np.testing.assert_allclose(r.neighbour_distances, d, rtol=1e-4)
    np.testing.assert_allclose(r.image_scores, s, rtol=1e-4)
    np.testing.assert_array_equal(np.argsort(r.image_scores), np.argsort(s))
    assert r.maps.shape == (len(queries), 64, 64) and r.maps.dtype == np.float32
    np.testing.assert_allclose(r.maps, m, rtol=1e-4, atol=1e-4 * np.abs(m).max())


def test_float16_store_is_close_to_float32(dataset):
    train = [s.path for s in images.discover(dataset)]
    test = [s.path for s in images.discover(dataset, "test")]
    a = Spade(dtype="float32", k_gallery=6, **SMALL).fit(train).score(test)
    b = Spade(dtype="float16", k_gallery=6, **SMALL).fit(train).score(test)
    np.testing.assert_array_equal(a.image_scores, b.image_scores)  # pool vectors stay float32
    np.testing.assert_allclose(b.maps, a.maps, rtol=2e-2)


def auroc(labels, scores):
    pos, neg = scores[labels == 1], scores[labels == 0]
    return (np.sum(pos[:, None] > neg[None]) + 0.5 * np.sum(pos[:, None] == neg[None])) / (len(pos) * len(neg))


def test_finds_synthetic_defects(tmp_path):
    from spade_faiss.synthetic import make_dataset
    root = make_dataset(tmp_path / "d", n_train=16, n_good=8, n_defect=8, size=(128, 128), seed=5)
    params = dict(SMALL, resize=144, crop=128)
    spade = Spade(k_gallery=8, **params).fit([s.path for s in images.discover(root)])
    test = images.discover(root, "test")
    r = spade.score([s.path for s in test])
    labels = np.array([s.label for s in test])
    assert auroc(labels, r.image_scores) > MIN_SYNTHETIC_AUROC
    for s, amap in zip(test, r.maps):
        if s.label:
            mask = images.load_mask(s.mask, (128, 128), 144, 128)
            assert mask[np.unravel_index(amap.argmax(), amap.shape)], s.path


def test_k_gallery_larger_than_corpus_is_clamped_with_a_warning(fitted, dataset):
    fitted.pixel_mode, fitted.kappa, fitted.k_gallery = "per_level", 1, 50
    with pytest.warns(UserWarning, match="k_gallery=50 > 12 images"):
        r = fitted.score([images.discover(dataset, "test")[0].path])
    assert r.neighbour_ids.shape == (1, 12)
    fitted.k_gallery = 6


def test_segment_gating_and_bad_inputs(fitted, dataset, tmp_path):
    test = [s.path for s in images.discover(dataset, "test")]
    (tmp_path / "bad.png").write_text("nope")
    r = fitted.score(test[:2] + [str(tmp_path / "bad.png")] + test[2:3], segment=False)
    assert r.maps is None and len(r.paths) == 3
    assert r.errors == [(str(tmp_path / "bad.png"), f"{tmp_path / 'bad.png'}: not a decodable image")]
    full = fitted.score(test)
    tau = float(np.median(full.image_scores))
    gated = fitted.score(test, segment=tau)
    np.testing.assert_array_equal(gated.segmented, full.image_scores > tau)
    np.testing.assert_allclose(gated.maps[gated.segmented], full.maps[gated.segmented], rtol=1e-6)
    assert np.all(gated.maps[~gated.segmented] == 0)


def test_open_refuses_other_weights(tmp_path, dataset):
    path = tmp_path / "c.h5"
    with Spade.create(path, **SMALL) as s:
        s.add(images.discover(dataset))
    with pytest.raises(StoreError, match="weights_sha256: store has"):
        Spade.open(path, **dict(SMALL, seed=1))
    with Spade.open(path, **SMALL) as s:
        assert len(s.store_) == 12 and s.index_.ntotal == 12


def test_unfitted_and_array_inputs(dataset):
    with pytest.raises(ValueError, match="not fitted"):
        Spade(**SMALL).score(["x.png"])
    rgb = images.load_image(images.discover(dataset)[0].path).rgb
    spade = Spade(k_gallery=2, k_image=1, **SMALL).fit([rgb, rgb[::-1].copy(), rgb[:, ::-1].copy()])
    r = spade.score([rgb])
    assert r.neighbour_ids[0, 0] == 0 and r.image_scores[0] == pytest.approx(0, abs=1e-6)
