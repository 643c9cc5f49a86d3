"""Spade equals a brute-force SPADE written from SPEC 1.1 (torch cdist over the full retrieved
galleries, float64), and finds seeded synthetic defects."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from spade_faiss import datasets, images
from spade_faiss.backbone import WeightsError, query_compute
from spade_faiss.detector import Spade
from spade_faiss.metrics import threshold_at_fpr

from .conftest import SMALL

MIN_SYNTHETIC_AUROC = 0.95


def oracle(spade, query_paths, k_image, k_gallery, kappa, mode, sigma):
    """SPADE from the contract: exact stage 1 with (distance, id) ordering, exact stage 2."""
    store = spade.store_
    q = spade.load_backbone().extractor_(np.stack([images.preprocess(images.load_image(p).rgb, spade.resize, spade.crop)
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
            s = feats[levels[0]].shape[:2]
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
    """Shared by the tests of this module: they use ``with_params`` copies, never mutate it."""
    train = [s.path for s in datasets.discover(dataset)]
    return Spade(storage="float32", k_gallery=6, k_image=3, **SMALL).fit(train)


@pytest.mark.parametrize("stage2", ["pruned", "faiss"])
@pytest.mark.parametrize("mode, kappa", [("per_level", 1), ("per_level", 3), ("concat", 1), ("concat", 3)])
def test_equals_brute_force_oracle(fitted, dataset, mode, kappa, stage2):
    # chunk_bytes: several chunks per gallery exercise the exact merge of the faiss engine
    spade = fitted.with_params(pixel_mode=mode, kappa=kappa, chunk_bytes=200_000, stage2=stage2)
    queries = [s.path for s in datasets.discover(dataset, "test")]
    r = spade.score(queries)
    s, m, ids, d = oracle(spade, queries, 3, 6, kappa, mode, 4.0)
    np.testing.assert_array_equal(r.neighbour_ids, ids)
    np.testing.assert_allclose(r.neighbour_distances, d, rtol=1e-4)
    np.testing.assert_allclose(r.image_scores, s, rtol=1e-4)
    np.testing.assert_array_equal(np.argsort(r.image_scores), np.argsort(s))
    assert r.maps.shape == (len(queries), 64, 64) and r.maps.dtype == np.float32
    np.testing.assert_allclose(r.maps, m, rtol=1e-4, atol=1e-4 * np.abs(m).max())
    assert fitted.pixel_mode == "per_level" and fitted.kappa == 1  # the shared fixture is untouched


def test_float16_store_is_close_to_float32(dataset):
    train = [s.path for s in datasets.discover(dataset)]
    test = [s.path for s in datasets.discover(dataset, "test")]
    a = Spade(storage="float32", k_gallery=6, **SMALL).fit(train).score(test)
    b = Spade(storage="float16", k_gallery=6, **SMALL).fit(train).score(test)
    np.testing.assert_array_equal(a.image_scores, b.image_scores)  # pool vectors stay float32
    np.testing.assert_allclose(b.maps, a.maps, rtol=2e-2)


def auroc(labels, scores):
    pos, neg = scores[labels == 1], scores[labels == 0]
    return (np.sum(pos[:, None] > neg[None]) + 0.5 * np.sum(pos[:, None] == neg[None])) / (len(pos) * len(neg))


def test_finds_synthetic_defects(tmp_path):
    from spade_faiss.synthetic import make_dataset
    root = make_dataset(tmp_path / "d", n_train=16, n_good=8, n_defect=8, size=(128, 128), seed=5)
    params = dict(SMALL, resize=144, crop=128)
    spade = Spade(k_gallery=8, **params).fit([s.path for s in datasets.discover(root)])
    test = datasets.discover(root, "test")
    r = spade.score([s.path for s in test])
    labels = np.array([s.label for s in test])
    assert auroc(labels, r.image_scores) > MIN_SYNTHETIC_AUROC
    for s, amap in zip(test, r.maps):
        if s.label:
            mask = images.load_mask(s.mask, (128, 128), 144, 128)
            assert mask[np.unravel_index(amap.argmax(), amap.shape)], s.path


def test_k_gallery_larger_than_corpus_is_clamped_with_a_warning(fitted, dataset):
    spade = fitted.with_params(k_gallery=50)
    with pytest.warns(UserWarning, match="k_gallery=50 > 12 images"):
        r = spade.score([datasets.discover(dataset, "test")[0].path])
    assert r.neighbour_ids.shape == (1, 12)


def test_maps_none_all_and_gated_and_bad_inputs(fitted, dataset, tmp_path):
    test = [s.path for s in datasets.discover(dataset, "test")]
    (tmp_path / "bad.png").write_text("nope")
    r = fitted.score(test[:2] + [str(tmp_path / "bad.png")] + test[2:3], maps=False)
    assert r.maps is None and len(r.paths) == 3 and r.is_anomalous is None
    assert r.errors == [(str(tmp_path / "bad.png"), f"{tmp_path / 'bad.png'}: not a decodable image")]
    full = fitted.score(test)
    with pytest.raises(ValueError, match="calibrate first"):
        fitted.score(test, maps="auto")
    with pytest.raises(ValueError, match="maps=0.5"):
        fitted.score(test, maps=0.5)
    tau = float(np.median(full.image_scores))
    spade = fitted.with_params().set_thresholds(tau=tau)
    gated = spade.score(test, maps="auto")
    np.testing.assert_array_equal(gated.segmented, full.image_scores > tau)
    np.testing.assert_array_equal(gated.is_anomalous, full.image_scores > tau)
    np.testing.assert_array_equal(gated.maps[gated.segmented], full.maps[gated.segmented])
    assert np.all(gated.maps[~gated.segmented] == 0)
    assert fitted.tau_ is None  # thresholds of a copy stay with the copy


def test_iter_score_yields_one_result_per_input_in_order(fitted, dataset, tmp_path):
    test = [s.path for s in datasets.discover(dataset, "test")]
    (tmp_path / "bad.png").write_text("nope")
    inputs = [test[0], str(tmp_path / "bad.png")] + test[1:]
    spade = fitted.with_params(batch_size=2)
    out = list(spade.iter_score(iter(inputs), maps=False))
    assert [r.path for r in out] == inputs
    assert out[1].error and out[1].score is None and all(r.error is None for r in out[:1] + out[2:])
    whole = fitted.score(test, maps=False)
    np.testing.assert_array_equal([r.score for r in out if not r.error], whole.image_scores)
    assert out[0].neighbour_paths == [fitted.paths_[i] for i in whole.neighbour_ids[0][:3]]


def test_open_uses_the_stored_weights_and_refuses_others(tmp_path, dataset):
    path = tmp_path / "c.h5"
    with Spade.create(path, k_gallery=6, **SMALL) as s:
        s.add(datasets.discover(dataset))
        want = s.score(datasets.discover(dataset, "test"), maps=False).image_scores
    with pytest.raises(WeightsError, match=r"weights=random init \(seed 1\) differ from those the corpus"):
        Spade.open(path, seed=1).load_backbone()
    with Spade.open(path, k_gallery=6) as s:  # backbone, crop, weights (random init, seed 0) from the corpus
        assert len(s.store_) == 12 and s.index_.ntotal == 12 and s.backbone == "resnet18" and s.weights is None
        np.testing.assert_array_equal(s.score(datasets.discover(dataset, "test"), maps=False).image_scores, want)


def test_parameters_are_checked_before_any_model_is_built(tmp_path):
    for bad, match in [(dict(index="hnsw"), "index='hnsw'"), (dict(batch_size=0), "batch_size=0"),
                       (dict(workers=-1), "workers=-1"), (dict(encoding="PQx"), "encoding='PQx'"),
                       (dict(k_image=9, k_gallery=3), "k_image=9"), (dict(stage2="gpu"), "stage2='gpu'"),
                       (dict(weights=str(tmp_path / "w.pth")), "no such file")]:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            Spade(**dict(SMALL, **bad)).fit(["never-read.png"])
    with pytest.raises(TypeError):
        Spade("wide_resnet50_2")  # keyword-only
    with pytest.raises(ValueError, match="unknown parameter"):
        Spade().set_params(k=3)


def test_feature_parameters_cannot_change_after_fit(fitted):
    with pytest.raises(ValueError, match="decide the stored features"):
        fitted.with_params(crop=32)
    with pytest.raises(ValueError, match="kappa=0"):
        fitted.with_params(kappa=0)
    assert fitted.kappa == 1 and fitted.config_.kappa == 1


def test_unfitted_and_array_inputs(dataset):
    with pytest.raises(ValueError, match="not fitted"):
        Spade(**SMALL).score(["x.png"])
    rgb = images.load_image(datasets.discover(dataset)[0].path).rgb
    spade = Spade(k_gallery=2, k_image=1, **SMALL).fit([rgb, rgb[::-1].copy(), rgb[:, ::-1].copy()])
    r = spade.score([rgb])
    assert r.neighbour_ids[0, 0] == 0 and r.image_scores[0] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("params", [dict(), dict(kappa=3), dict(pixel_mode="concat")], ids=["default", "kappa3",
                                                                                              "concat"])
def test_an_image_scores_bitwise_the_same_alone_and_in_any_batch(fitted, dataset, params):
    test = [s.path for s in datasets.discover(dataset, "test")]
    spade = fitted.with_params(**params)
    alone = {p: spade.score([p]) for p in test}
    for batch_size, order in ((1, test), (3, test[::-1]), (8, test[2:] + test[:2])):
        together = spade.with_params(batch_size=batch_size).score(order)
        for i, p in enumerate(order):
            assert together.image_scores[i] == alone[p].image_scores[0], (batch_size, p)
            np.testing.assert_array_equal(together.neighbour_ids[i], alone[p].neighbour_ids[0])
            np.testing.assert_array_equal(together.maps[i], alone[p].maps[0])


def correspondence_oracle(spade, path, ids, levels, radius=None):
    """For each level and location, the nearest stored vector by the exact distance (ties: lowest
    image id, then lowest position), among the retrieved images (within the window)."""
    from spade_faiss.patch_search import exact
    extractor = spade.load_backbone().extractor_
    feats = extractor(images.preprocess(images.load_image(path).rgb, spade.resize, spade.crop)[None],
                      compute=query_compute(spade.config_.search, extractor.device))  # the search's own queries
    out = {}
    for lv in levels:
        q = feats[lv][0]
        h, w, c = q.shape
        rows = np.sort(ids)
        gal = spade.store_.level(lv, rows).astype(np.float32).reshape(len(rows), h * w, c)
        found = np.empty((h, w, 3), np.int32)
        for y in range(h):
            for x in range(w):
                d = exact.squared_distances(torch.from_numpy(q[y, x])[None, None],
                                            torch.from_numpy(gal)).numpy()  # (K, hw)
                if radius is not None:
                    yy, xx = np.divmod(np.arange(h * w), w)
                    d[:, (np.abs(yy - y) > radius) | (np.abs(xx - x) > radius)] = np.inf
                k, pos = np.unravel_index(np.lexsort((np.arange(d.size), d.ravel()))[0], d.shape)
                found[y, x] = (rows[k], pos // w, pos % w)
        out[lv] = found
    return out


@pytest.mark.parametrize("search", ["exact", "window", "fast"])
def test_correspondences_are_the_brute_force_argmin_with_ties_to_the_lowest_image(dataset, tmp_path, search):
    # Two corpus files with the same pixels (other bytes): identical features, exact ties.
    train = [s.path for s in datasets.discover(dataset)][:6]
    rgb = images.load_image(train[2]).rgb
    import cv2
    twin = str(tmp_path / "twin.png")
    cv2.imwrite(twin, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 0])
    params = dict(SMALL, storage="float32", k_gallery=4, k_image=2, search=search, radius=1)
    spade = Spade(**params).fit(train + [twin])
    queries = [s.path for s in datasets.discover(dataset, "test")][:2] + [train[2]]
    r = spade.score(queries, correspondences=True)
    for i, path in enumerate(queries):
        want = correspondence_oracle(spade, path, r.neighbour_ids[i], spade.config_.levels,
                                     {"window": 1, "fast": 0}.get(search))  # fast: radius 0 whatever --radius says
        for lv in spade.config_.levels:
            np.testing.assert_array_equal(r.correspondences[i][lv], want[lv], err_msg=f"{path} {lv}")
    own = r.correspondences[2]["layer1"]  # the indexed image: each location matches itself, the lower twin
    h, w = own.shape[:2]
    assert (own[..., 0] == 2).all() and (own[..., 1] == np.arange(h)[:, None]).all()
    assert (own[..., 2] == np.arange(w)[None, :]).all()


def test_calibration_says_when_its_sample_cannot_support_the_fpr(dataset):
    train = [s.path for s in datasets.discover(dataset)]
    spade = Spade(k_gallery=4, **SMALL).fit(train[:8])
    with pytest.warns(UserWarning, match=r"3 held-out images cannot support fpr=0.01 \(about 100 are needed\)"):
        th = spade.calibrate(train[8:11], fpr=0.01)
    assert th["images_above_tau"] == 0 and th["n_images"] == 3
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert spade.calibrate(train[8:12], fpr=0.5)["images_above_tau"] == 2


def test_the_leave_one_out_colour_scale_is_kept_in_the_corpus_by_its_writer(tmp_path, dataset, monkeypatch):
    from spade_faiss.datasets import discover as find

    path = tmp_path / "c.h5"
    with Spade.create(path, **SMALL) as writer:
        writer.add([s.path for s in find(dataset, "train")])
        theta = writer.leave_one_out_theta()
    with Spade.open(path) as reader:  # read-only: takes it from the file, computes nothing
        monkeypatch.setattr(reader.pipeline_, "leave_one_out_theta", lambda *a: pytest.fail("recomputed"))
        assert reader.leave_one_out_theta() == theta
    with Spade.open(path, k_gallery=3) as other:  # other scoring parameters: its own value
        monkeypatch.setattr(other.pipeline_, "leave_one_out_theta", lambda *a: 1.5)
        assert other.leave_one_out_theta() == 1.5


def test_the_pruned_engine_s_projections_are_kept_by_the_writer_and_change_no_result(tmp_path, dataset,
                                                                                     monkeypatch):
    import shutil

    import h5py

    from spade_faiss.datasets import discover as find
    from spade_faiss.patch_search import Projection

    path = tmp_path / "c.h5"
    test = [s.path for s in find(dataset, "test")]
    with Spade.create(path, **SMALL, k_gallery=5, stage2="pruned") as writer:
        writer.add([s.path for s in find(dataset, "train")])
        want = writer.score(test).maps
    bare = tmp_path / "bare.h5"
    shutil.copy(path, bare)
    with h5py.File(bare, "a") as h:
        assert {"layer1", "layer2", "layer3"} <= set(h["projections"])
        del h["projections"]
    with Spade.open(bare, k_gallery=5, stage2="pruned") as fitted:  # fits its own (read-only: keeps none)
        np.testing.assert_array_equal(fitted.score(test).maps, want)
    monkeypatch.setattr(Projection, "fit", classmethod(lambda *a: pytest.fail("fitted again")))
    with Spade.open(path, k_gallery=5, stage2="pruned") as reader:
        np.testing.assert_array_equal(reader.score(test).maps, want)


def test_a_model_is_shared_only_between_corpora_of_one_model_key():
    one, same, other = (Spade(backbone=b) for b in ("resnet18", "resnet18", "resnet50"))
    for s in (one, same, other):
        s._configure()
    assert one.model_key == same.model_key != other.model_key
    with pytest.raises(ValueError, match="cannot share a model: this corpus needs resnet18"):
        one.share_backbone(other)


def test_float32_operands_use_the_first_columns_of_the_kept_basis_and_change_no_result(tmp_path, dataset,
                                                                                       monkeypatch):
    """The corpus keeps the basis fitted at the full width (WIDTHS); a process whose bound GEMM
    runs in float32 takes its first FLOAT32_WIDTHS columns, and the maps are the same bits."""
    import h5py

    from spade_faiss import patch_search
    from spade_faiss.datasets import discover as find
    from spade_faiss.patch_search import pruned

    path = tmp_path / "c.h5"
    train, test = [s.path for s in find(dataset, "train")], [s.path for s in find(dataset, "test")]
    monkeypatch.setattr(pruned, "operand_dtype", lambda: torch.bfloat16)
    with Spade.create(path, **SMALL, k_gallery=5, stage2="pruned") as writer:
        writer.add(train)
        want = writer.score(test).maps
        full = {name: p.basis.shape[1] for name, p in writer.pipeline_.projections.items()}
    monkeypatch.setattr(pruned, "operand_dtype", lambda: torch.float32)
    monkeypatch.setattr(patch_search, "FLOAT32_WIDTHS", ((0, 12),))  # 5 dimensions at every grid
    with Spade.open(path, k_gallery=5, stage2="pruned") as narrow:
        np.testing.assert_array_equal(narrow.score(test).maps, want)
        used = narrow.pipeline_.projections
        with h5py.File(path, "r") as h:
            for name, width in full.items():
                kept = h[f"projections/{name}/basis"][()]
                assert kept.shape[1] == width > 5 and used[name].basis.shape[1] == 5
                np.testing.assert_array_equal(used[name].basis, kept[:, :5])


def test_the_calibration_diagnostics_name_an_outlier_and_a_held_out_set_unlike_the_corpus():
    from spade_faiss.detector.thresholds import diagnose

    normal = list(np.linspace(10.0, 12.0, 40))
    corpus = {"min": 9.0, "q25": 10.0, "median": 11.0, "q75": 11.5, "max": 13.0}
    assert diagnose(normal, 12.0, 0, 0.05, corpus) == []
    one_outlier = normal + [40.0]  # tau becomes its one maximum
    (message,) = diagnose(one_outlier, 40.0, 0, 0.05, corpus)
    assert "rests on 1 far-out held-out score" in message
    session = list(np.linspace(20.0, 22.0, 40))  # another acquisition session: every score above the corpus's
    (message,) = diagnose(session, 22.0, 0, 0.05, corpus)
    assert "look unlike the corpus" in message and "--hold-out" in message
    assert diagnose(session, 22.0, 0, 0.05, None) == []  # without the corpus's scores nothing to compare


def test_calibrate_warns_when_tau_rests_on_one_outlier_and_records_the_spreads(dataset):
    train = [s.path for s in datasets.discover(dataset)]
    outlier = np.full((96, 96, 3), 255, np.uint8)  # a blank white frame among normal textures
    outlier[::7] = 0
    spade = Spade(k_gallery=4, **SMALL).fit(train[:8])
    with pytest.warns(UserWarning, match="rests on 1 far-out held-out score"):
        th = spade.calibrate(train[8:12] + [outlier], fpr=0.01)
    assert th["held_out_scores"]["max"] == pytest.approx(th["tau"])
    assert th["corpus_scores"]["min"] <= th["corpus_scores"]["median"] <= th["corpus_scores"]["max"]


@pytest.mark.parametrize("how", ["map_top1", "map_max"])
def test_a_map_based_image_score_is_the_oracle_s_and_decides_with_tau(fitted, dataset, how):
    """Issue 38: image_score=map_top1 (mean of the top 1% of the map's pixels, an independent
    sort) or map_max is the score compared with tau and calibrated on; the paper's knn score is
    reported beside it and equals the default's; maps none/auto are refused (no map, no score)."""
    test = [s.path for s in datasets.discover(dataset, "test")]
    default = list(fitted.iter_score(test))
    spade = fitted.with_params(image_score=how)
    results = list(spade.iter_score(test))
    for d, r in zip(default, results):
        np.testing.assert_array_equal(r.map, d.map)
        flat = np.sort(d.map.ravel().astype(np.float64))[::-1]
        want = flat[0] if how == "map_max" else flat[:int(np.ceil(0.01 * flat.size))].mean()
        assert r.score == pytest.approx(want, rel=1e-12) and r.map_score == r.score
        assert r.knn_score == d.score == d.knn_score and d.map_score == pytest.approx(
            flat[:int(np.ceil(0.01 * flat.size))].mean(), rel=1e-12)
    with warnings.catch_warnings():  # test images as held-out stand-ins: only the rule matters here
        warnings.simplefilter("ignore")
        record = spade.with_params().calibrate(test[:3], fpr=0.34)
    assert record["tau"] == threshold_at_fpr([r.score for r in results[:3]], 0.34)
    assert record["tau"] != threshold_at_fpr([r.knn_score for r in results[:3]], 0.34)
    with pytest.raises(ValueError, match="computed from the map"):
        spade.score(test, maps=False)
