"""Stored representations (representations.py): every one round-trips through the corpus file,
and stage 2 over it equals brute force over its *decoded* features: bit for bit in its search
space (exact.py's distance), and to float rounding in feature space (the isometry it claims)."""

import os

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spade_faiss import datasets
from spade_faiss.config import SpadeConfig
from spade_faiss.detector import Spade, convert
from spade_faiss.patch_search import exact
from spade_faiss.representations import CODE_MAX, Representation, per_level
from spade_faiss.store import FeatureStore, StoreError

from .conftest import SMALL

SHAPES = {"layer1": (8, 8, 16), "layer2": (4, 4, 24), "layer3": (2, 2, 32)}
STORAGES = ["float16", "float32", "float16+zstd", "pca6", "layer1=pca8,layer2=float16+zstd,layer3=pca5"]


def _feats(rng, b):
    f = {lv: np.maximum(rng.standard_normal((b, *s)), 0).astype(np.float32) for lv, s in SHAPES.items()}
    f["pool"] = rng.standard_normal((b, 16)).astype(np.float32)
    return f


@pytest.mark.parametrize("storage", STORAGES)
def test_every_representation_round_trips_through_the_file(tmp_path, rng, storage):
    cfg = SpadeConfig(backbone="resnet18", weights_sha256="ab" * 32, resize=72, crop=64, storage=storage)
    store = FeatureStore.create(tmp_path / "c.h5", cfg, SHAPES, 16)
    f = _feats(rng, 5)
    if store.needs_fit:
        with pytest.raises(StoreError, match="not fitted"):
            store.append(list("abcde"), [c * 64 for c in "01234"], f)
        store.fit_representations(f, seed=0)
    store.append(list("abcde"), [c * 64 for c in "01234"], f)
    expected = {lv: store.representations[lv].decode(store.representations[lv].encode(f[lv])) for lv in SHAPES}
    store.close()
    with FeatureStore.open(tmp_path / "c.h5") as s:
        assert s.config.storage == cfg.storage and not s.needs_fit
        for lv in per_level(storage, list(SHAPES)):
            got = s.level(lv, [4, 0, 2])
            np.testing.assert_array_equal(got, expected[lv][[4, 0, 2]])
            rep = s.representations[lv]
            if rep.is_pca:
                assert got.dtype == np.float32 and got.shape[-1] == rep.dims + 1 and (got[..., -1] == 0).all()
            else:  # lossless: exactly the values as stored
                np.testing.assert_array_equal(got, f[lv][[4, 0, 2]].astype(rep.stored_dtype))
        # Bytes read: 3 rows per level, compressed chunks at their stored size, others raw.
        want = 0
        for lv in SHAPES:
            ds = s.h5["levels"][lv]
            want += sum(ds.id.get_chunk_info_by_coord((i, 0, 0, 0)).size if ds.compression else ds[i].nbytes
                        for i in (4, 0, 2))
        assert s.bytes_read == want
        info = s.describe()
        assert info["bytes_per_image"]["total"] == sum(info["bytes_per_image"][k] for k in (*SHAPES, "pool"))
    with h5py.File(tmp_path / "c.h5") as h:
        assert all(h["levels"][lv].fletcher32 for lv in SHAPES)


def test_pca_codes_are_the_nearest_int8_steps_of_the_projection(rng):
    x = rng.standard_normal((4000, 12)) @ rng.standard_normal((12, 12))
    rep = Representation("pca5", 12)
    rep.fit(x, seed=0)
    basis, mean, step = rep.state["basis"], rep.state["mean"], rep.state["step"]
    np.testing.assert_allclose(basis.T @ basis, np.eye(5), atol=1e-12)
    codes = rep.encode(x.astype(np.float32))
    assert codes.dtype == np.int8 and codes.shape == (4000, 6) and np.abs(codes[:, :5]).max() == CODE_MAX
    assert not codes[:, 5].any()  # within the fitted range: exponent 0
    coords = (x.astype(np.float32).astype(np.float64) - mean) @ basis
    assert np.abs(codes[:, :5] * step.astype(np.float64) - coords).max() <= step.max() / 2 * (1 + 1e-6)
    # The query side: distance in the search space = distance to the decoded features.
    q = rng.standard_normal((7, 12)).astype(np.float32)
    g = rep.decoded_features(codes[:9])
    want = ((q[:, None, :].astype(np.float64) - g[None]) ** 2).sum(-1)
    qs, gs = rep.query(q), rep.decode(codes[:9])
    got = ((qs[:, None, :].astype(np.float64) - gs[None]) ** 2).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_pca_codes_never_clip_a_location_beyond_the_fitted_range(rng):
    """Steps are fitted on the first images; a later location with coordinates 40x larger gets
    an exponent (codes of step 2^e) and decodes within half a step 2^e of its projection on
    every coordinate. Without the exponent (files of 0.3.1) it was clipped at 127 steps and
    decoded far away: the 46x map outlier of compact storage."""
    x = rng.standard_normal((2000, 12)) @ rng.standard_normal((12, 12))
    rep = Representation("pca5", 12)
    rep.fit(x, seed=0)
    far = np.concatenate([x[:50], 40 * x[50:100]]).astype(np.float32)
    coords = (far.astype(np.float64) - rep.state["mean"]) @ rep.state["basis"]
    codes = rep.encode(far)
    e = codes[:, 5].astype(int)
    assert (e[:50] == 0).all() and (e[50:] >= 1).all() and np.abs(codes[:, :5]).max() <= CODE_MAX
    half_step = rep.state["step"].astype(np.float64) * 2.0 ** e[:, None] / 2
    assert (np.abs(rep.decode(codes)[:, :5] - coords) <= half_step * (1 + 1e-5)).all()
    proj = rep.state["mean"] + coords @ rep.state["basis"].T
    size = np.linalg.norm(coords, axis=1)
    exact = np.linalg.norm(rep.decoded_features(codes) - proj, axis=1) / size
    legacy = Representation("pca5", 12, rep.state, exponent=False)
    clipped = np.linalg.norm(legacy.decoded_features(legacy.encode(far)) - proj, axis=1) / size
    assert exact[50:].max() < 0.02 and clipped[50:].min() > 0.3  # relative error of the far locations


def test_pca_query_encoding_does_not_depend_on_the_thread_count(rng):
    rep = Representation("pca6", 16)
    rep.fit(rng.standard_normal((500, 16)), seed=0)
    q = rng.standard_normal((8, 8, 16)).astype(np.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rep.query(q)
        torch.set_num_threads(2)
        two = rep.query(q)
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(one, two)


@pytest.fixture(scope="module")
def corpora(dataset, tmp_path_factory):
    """The same 12 training images in a corpus of each representation (resnet18 has 64/128/256 channels)."""
    train = [s.path for s in datasets.discover(dataset)]
    root = tmp_path_factory.mktemp("reps")
    out = {}
    for storage in ("float32", "float16+zstd", "layer1=pca12,layer2=pca20,layer3=float16", "pca16"):
        path = root / f"{len(out)}.h5"
        with Spade.create(path, storage=storage, k_gallery=6, k_image=3, **SMALL) as spade:
            assert spade.add(train).added == 12
        out[storage] = path
    return out


def _upsample(t, size):
    return F.interpolate(t.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


def _feature_space_level_scores(spade, r, q_feats, kappa, mode):
    """Brute force in float64 between the query's features and the decoded gallery features."""
    store, levels = spade.store_, spade.config_.levels
    ids = np.sort(r.neighbour_ids)
    gal = {lv: torch.from_numpy(store.representations[lv].decoded_features(store.stored_level(lv, ids)))
           .double() for lv in levels}
    feats = {lv: torch.from_numpy(q_feats[lv]).double() for lv in levels}
    if mode == "concat":
        size = feats["layer1"].shape[:2]
        feats = {"concat": torch.cat([_upsample(feats[lv][None], size)[0] for lv in levels], -1)}
        gal = {"concat": torch.cat([_upsample(gal[lv], size) for lv in levels], -1)}
    out = {}
    for name, f in feats.items():
        h, w, c = f.shape
        d = torch.cdist(f.reshape(-1, c), gal[name].reshape(-1, c)) ** 2
        out[name] = d.topk(kappa, dim=1, largest=False).values.mean(1).reshape(h, w).numpy()
    return out


def _search_space_level_scores(spade, r, q_feats, kappa, mode):
    """Brute force with exact.py's distance in the representation's search space."""
    pipeline, levels = spade.pipeline_, spade.config_.levels
    from spade_faiss.results import Retrieved
    query = pipeline._search_space(Retrieved(None, q_feats, 0.0, r.neighbour_ids, None), mode, levels)
    ids = np.sort(r.neighbour_ids)
    from spade_faiss.galleries import load_entries
    entries = load_entries(spade.store_.level, [(mode, int(i)) for i in ids], levels)
    out = {}
    for name, q in query.items():
        c = q.shape[-1]
        g = torch.from_numpy(np.concatenate([e[name].reshape(-1, c) for e in entries]).astype(np.float32))
        rows = torch.from_numpy(q.reshape(-1, 1, c))
        d = torch.cat([exact.squared_distances(rows[i:i + 32], g[None]) for i in range(0, len(rows), 32)])
        best = d.sort(dim=1).values[:, :kappa].double().mean(1).float()
        out[name] = best.reshape(q.shape[:2]).numpy()
    return out


@pytest.mark.parametrize("storage", ["float32", "float16+zstd", "layer1=pca12,layer2=pca20,layer3=float16", "pca16"])
@pytest.mark.parametrize("mode, kappa", [("per_level", 1), ("per_level", 3), ("concat", 1), ("concat", 3)])
def test_stage2_equals_brute_force_over_the_decoded_features(corpora, dataset, storage, mode, kappa):
    queries = [s.path for s in datasets.discover(dataset, "test")][:3]
    with Spade.open(corpora[storage], pixel_mode=mode, kappa=kappa, k_gallery=6, device="cpu") as spade:
        results = list(spade.iter_score(queries, correspondences=True))
        feats = spade.extractor_(np.stack([spade._batches([q]).__next__()[0].tensor for q in queries]))
        for i, r in enumerate(results):
            q_feats = {lv: feats[lv][i] for lv in spade.config_.levels}
            bitwise = _search_space_level_scores(spade, r, q_feats, kappa, mode)
            near = _feature_space_level_scores(spade, r, q_feats, kappa, mode)
            for name, got in r.level_scores.items():
                np.testing.assert_array_equal(got, bitwise[name])
                np.testing.assert_allclose(got, near[name], rtol=2e-5, atol=1e-5 * np.abs(near[name]).max())


def test_lossless_storage_gives_exactly_the_float16_maps(corpora, dataset, tmp_path):
    train = [s.path for s in datasets.discover(dataset)]
    with Spade.create(tmp_path / "f16.h5", storage="float16", k_gallery=6, k_image=3, **SMALL) as spade:
        spade.add(train)
    queries = [s.path for s in datasets.discover(dataset, "test")]
    with Spade.open(tmp_path / "f16.h5", k_gallery=6) as a, Spade.open(corpora["float16+zstd"], k_gallery=6) as b:
        ra, rb = a.score(queries), b.score(queries)
        np.testing.assert_array_equal(ra.maps, rb.maps)
        np.testing.assert_array_equal(ra.image_scores, rb.image_scores)
        sizes = a.info()["bytes_per_image"], b.info()["bytes_per_image"]
        assert sizes[1]["layer1"] < sizes[0]["layer1"]


def test_a_pca_corpus_is_fitted_on_its_first_images_and_keeps_that_fit(dataset, tmp_path):
    train = [s.path for s in datasets.discover(dataset)]
    path = tmp_path / "p.h5"
    with Spade.create(path, storage="pca16", **SMALL) as spade:
        spade.add(train[:5])
        basis = spade.store_.representations["layer1"].state["basis"].copy()
    with Spade.open(path, "a") as spade:
        spade.add(train[5:])
        assert len(spade.store_) == 12
        np.testing.assert_array_equal(spade.store_.representations["layer1"].state["basis"], basis)


def _as_format_v1(src, dst):
    """The corpus ``src`` (float16, v2) written as format v1 wrote it: no checksums, no
    ``feature_shapes``, ``dtype`` in the config."""
    import json

    from spade_faiss.store.layout import write_layout

    with h5py.File(src) as a, h5py.File(dst, "w") as b:
        attrs = {k: v for k, v in a.attrs.items() if k not in ("feature_shapes", "n_committed", "writer")}
        config = json.loads(attrs["config"])
        config["dtype"] = config.pop("storage")
        attrs.update(format_version=1, config=json.dumps(config, sort_keys=True))
        n = int(a.attrs["n_committed"])
        levels = {lv: (a["levels"][lv].shape[1:], a["levels"][lv].dtype, {}) for lv in a["levels"]}
        write_layout(b, attrs, levels, a["images/pool"].shape[1], n)
        for name in ["images/path", "images/sha256", "images/pool"] + [f"levels/{lv}" for lv in levels]:
            b[name][:] = a[name][:n]
        b["index"].create_dataset("faiss", data=a["index/faiss"][()])
        b["index"].attrs.update(dict(a["index"].attrs))


def test_a_format_v1_corpus_scores_bitwise_as_before_and_converts(dataset, tmp_path):
    train = [s.path for s in datasets.discover(dataset)]
    queries = [s.path for s in datasets.discover(dataset, "test")]
    with Spade.create(tmp_path / "v2.h5", storage="float16", k_gallery=6, k_image=3, **SMALL) as spade:
        spade.add(train)
        want = spade.score(queries)
    _as_format_v1(tmp_path / "v2.h5", tmp_path / "v1.h5")
    with Spade.open(tmp_path / "v1.h5", k_gallery=6, k_image=3) as spade:
        assert spade.info()["format_version"] == 1 and spade.config_.storage == "float16"
        got = spade.score(queries)
    np.testing.assert_array_equal(got.maps, want.maps)
    np.testing.assert_array_equal(got.image_scores, want.image_scores)
    from spade_faiss.apps.verify import verify
    from spade_faiss.detector import convert

    assert verify(tmp_path / "v1.h5", deep=True) == []
    info = convert(tmp_path / "v1.h5", tmp_path / "migrated.h5", "float16")
    assert info["format_version"] == 2 and info["images"] == 12
    with Spade.open(tmp_path / "migrated.h5", k_gallery=6, k_image=3) as spade:
        np.testing.assert_array_equal(spade.score(queries).maps, want.maps)
    info = convert(tmp_path / "v1.h5", tmp_path / "small.h5", "compact")
    assert info["bytes_per_image"]["total"] < 0.15 * 2 * sum(64 * 16 * 16 * 2 ** i for i in range(3))
    assert verify(tmp_path / "small.h5", deep=True) == []
    convert(tmp_path / "small.h5", tmp_path / "same.h5", "compact")  # pca codes copied with their fit
    with Spade.open(tmp_path / "small.h5", k_gallery=6, k_image=3) as a, \
            Spade.open(tmp_path / "same.h5", k_gallery=6, k_image=3) as b:
        np.testing.assert_array_equal(a.score(queries).maps, b.score(queries).maps)
    (tmp_path / "same.h5").unlink()
    with pytest.raises(StoreError, match="original features are not in the file"):
        convert(tmp_path / "small.h5", tmp_path / "back.h5", "float32")
    with pytest.raises(FileExistsError):
        convert(tmp_path / "v1.h5", tmp_path / "small.h5", "float16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["migrated.h5", "small.h5", "v1.h5", "v2.h5"]


@pytest.mark.parametrize("storage", ["float16", "float16+zstd", "pca16"])
def test_verify_deep_names_a_damaged_level_chunk(dataset, tmp_path, storage):
    from spade_faiss.apps.verify import verify

    train = [s.path for s in datasets.discover(dataset)]
    path = tmp_path / "c.h5"
    with Spade.create(path, storage=storage, **SMALL) as spade:
        spade.add(train)
    with h5py.File(path) as h:
        info = h["levels/layer2"].id.get_chunk_info(5)
    with open(path, "r+b") as f:  # 64 finite values' worth of bytes changed in row 5's chunk
        f.seek(info.byte_offset + info.size // 2)
        f.write(bytes(range(128)))
    problems = verify(path, deep=True)
    assert len(problems) == 1 and "levels/layer2 row 5" in problems[0], problems


@pytest.mark.parametrize("dataset_name", ["images/pool", "index/faiss", "representations/layer1/basis"])
def test_damage_to_any_dataset_is_named_not_scored(dataset, tmp_path, dataset_name):
    """Finite bytes changed inside a checksummed dataset: verify names it, and scoring refuses
    instead of giving other scores (stage 1 reads the index's own copy of the pooled vectors, so
    a damaged images/pool changes no score: verify alone reports it)."""
    from spade_faiss.apps.verify import verify

    train = [s.path for s in datasets.discover(dataset)]
    path = tmp_path / "c.h5"
    with Spade.create(path, storage="pca16", **SMALL) as spade:
        spade.add(train)
    with h5py.File(path) as h:
        ds = h[dataset_name]
        info = ds.id.get_chunk_info(0)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + min(64, info.size // 2))
        f.write(bytes(range(100, 164)))
    problems = verify(path, deep=True)
    assert problems and any(dataset_name.split("/")[0] in p for p in problems), problems
    if dataset_name == "images/pool":
        return
    with pytest.raises(ValueError, match="damaged"):
        with Spade.open(path, k_gallery=6) as spade:
            spade.score(train[:1])


def test_verify_finds_an_index_that_disagrees_with_the_pooled_vectors(dataset, tmp_path):
    from spade_faiss.apps.verify import verify

    train = [s.path for s in datasets.discover(dataset)]
    path = tmp_path / "c.h5"
    with Spade.create(path, **SMALL) as spade:
        spade.add(train)
    from spade_faiss.store.digests import row_digests

    with h5py.File(path, "r+") as h:  # another pooled vector with its own digest: the index disagrees
        h["images/pool"][3] = h["images/pool"][3] + 1.0
        h["digests/pool"][3] = row_digests(h["images/pool"][3:4])[0]
    problems = verify(path, deep=True)
    assert any("rows [3]" in p for p in problems), problems


def _fletcher_blind_damage(path, dataset_name: str, row: int) -> None:
    """Turn 16-bit words 0x0000 of a row's stored chunk into 0xFFFF: fletcher32 sums words
    modulo 65535, where the two are equal, so the chunk's checksum still passes."""
    with h5py.File(path) as h:
        info = h[dataset_name].id.get_chunk_info_by_coord((row,) + (0,) * (h[dataset_name].ndim - 1))
    with open(path, "r+b") as f:
        f.seek(info.byte_offset)
        chunk = bytearray(f.read(info.size - 4))  # the checksum's 4 bytes end the chunk
        zeros = [i for i in range(0, len(chunk) - 1, 2) if chunk[i:i + 2] == b"\0\0"][:64]
        assert zeros, "no zero word to damage"
        for i in zeros:
            chunk[i:i + 2] = b"\xff\xff"
        f.seek(info.byte_offset)
        f.write(chunk)


@pytest.mark.parametrize("storage", ["float16", "compact"])
def test_damage_fletcher32_cannot_see_is_refused_by_the_digest(dataset, tmp_path, storage):
    """Issue 36, class 4: words 0x0000 -> 0xFFFF pass fletcher32; every reader (verify --deep,
    a gallery read for stage 2, a copy) refuses the row by its sha256 digest, naming the image,
    instead of scoring NaN or other numbers."""
    from spade_faiss.apps.verify import verify
    from spade_faiss.detector import convert

    train = sorted(s.path for s in datasets.discover(dataset))
    path = tmp_path / "c.h5"
    with Spade.create(path, storage=storage, **SMALL) as spade:
        spade.add(train)
    with h5py.File(path) as h:
        assert h["levels/layer1"].fletcher32 and h["digests/layer1"].shape == (len(train), 32)
        h["levels/layer1"][3]  # reads before the damage
    _fletcher_blind_damage(path, "levels/layer1", 3)
    with h5py.File(path) as h:
        h["levels/layer1"][3]  # fletcher32 passes: the damage is invisible to HDF5
    problems = verify(path, deep=True)
    assert len(problems) == 1 and "layer1 of image 3" in problems[0] and train[3] in problems[0], problems
    with Spade.open(path, k_gallery=3) as spade:  # queries whose gallery holds image 3 fail, naming it
        results = list(spade.iter_score(train[:8]))
        failed = [r for r in results if r.error]
        assert failed and all(r.map is None and "layer1 of image 3" in r.error and
                              os.path.basename(train[3]) in r.error and "damaged" in r.error for r in failed)
        assert 0 < len(failed) < len(results)
        assert all(r.map is not None and np.isfinite(r.map).all() for r in results if r.error is None)
        assert all(3 not in spade.retrieve([r.path])[0].neighbour_ids for r in results if r.error is None)
    with pytest.raises(ValueError, match="does not match its digest"):
        convert(path, tmp_path / "copy.h5", storage)


def test_rows_written_without_digests_are_read_unchecked(dataset, tmp_path):
    """A corpus from a version without digests (no digests group) and rows past a digests
    dataset (appended by such a version) read as before."""
    train = sorted(s.path for s in datasets.discover(dataset))
    path = tmp_path / "c.h5"
    with Spade.create(path, **{**SMALL, "k_gallery": 4}) as spade:
        spade.add(train[:4])
        want = spade.score(train[4:6]).maps
    with h5py.File(path, "r+") as h:
        for name in list(h["digests"]):
            h["digests"][name].resize(2, axis=0)  # rows 2.. have no digest
    with Spade.open(path, k_gallery=4) as spade:
        np.testing.assert_array_equal(spade.score(train[4:6]).maps, want)
    with h5py.File(path, "r+") as h:
        del h["digests"]
    with Spade.open(path, k_gallery=4) as spade:
        np.testing.assert_array_equal(spade.score(train[4:6]).maps, want)


def _without_exponents(path) -> None:
    """Make a pca corpus as 0.3.1 wrote it: codes without the exponent channel (the old
    encoder's: clipped at 127 steps), their digests recomputed."""
    from spade_faiss.store.digests import row_digests

    with h5py.File(path, "r+") as h:
        for lv in list(h["levels"]):
            ds = h["levels"][lv]
            stored = ds[:]
            scaled = stored[..., :-1].astype(np.int64) << stored[..., -1:].astype(np.int64)
            legacy = np.clip(scaled, -CODE_MAX, CODE_MAX).astype(np.int8)
            spec = dict(maxshape=(None, *legacy.shape[1:]), chunks=(1, *legacy.shape[1:]), fletcher32=True)
            del h["levels"][lv]
            h["levels"].create_dataset(lv, data=legacy, **spec)
            h[f"digests/{lv}"][: len(legacy)] = row_digests(legacy)


def test_a_pca_corpus_of_0_3_1_reads_grows_and_converts_as_before(dataset, tmp_path):
    """Without the exponent channel: read with the old decoding, grown while served (segments
    like it, merged by the next lone writer), and converted into the new layout (codes copied
    with a zero exponent) scoring bitwise the same."""
    train = [s.path for s in datasets.discover(dataset)]
    test = [s.path for s in datasets.discover(dataset, "test")]
    old = tmp_path / "old.h5"
    with Spade.create(old, storage="pca12", **SMALL, k_gallery=4) as spade:
        spade.add(train[:8])
    _without_exponents(old)
    with FeatureStore.open(old) as s:
        assert not any(r.exponent for r in s.representations.values())
    reader = Spade.open(old, k_gallery=4)  # a service: the next images go beside it, as segments
    try:
        with Spade.open(old, "a", k_gallery=4) as writer:
            writer.add(train[8:10])
        assert reader.refresh()["added"] == 2
        served = reader.score(test)
    finally:
        reader.close()
    with Spade.open(old, "a", k_gallery=4) as writer:  # the lone writer merges the segment
        assert len(writer.paths_) == 10
    from spade_faiss.apps.verify import verify

    assert verify(str(old), deep=True) == []
    new = tmp_path / "new.h5"
    convert(old, new, "pca12")
    with FeatureStore.open(new) as s:
        assert all(r.exponent for r in s.representations.values())
    with Spade.open(old, k_gallery=4) as a, Spade.open(new, k_gallery=4) as b:
        got, want = a.score(test), b.score(test)
    np.testing.assert_array_equal(got.image_scores, want.image_scores)
    np.testing.assert_array_equal(got.maps, want.maps)
    np.testing.assert_array_equal(got.image_scores, served.image_scores)
