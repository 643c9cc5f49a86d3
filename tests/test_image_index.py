"""Flat equals brute force; IVF recall; ties; persistence in the store and in a sidecar."""

import numpy as np
import pytest

from spade_faiss import image_index
from spade_faiss.config import SpadeConfig
from spade_faiss.image_index import ImageIndex
from spade_faiss.store import FeatureStore

IVF_MIN_RECALL_AT_50 = 0.95


def clustered(rng, n, d=64, clusters=40):
    centres = rng.standard_normal((clusters, d)).astype(np.float32) * 4
    return (centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d))).astype(np.float32)


def brute_force(xb, xq, k):
    d = ((xq[:, None, :].astype(np.float64) - xb[None].astype(np.float64)) ** 2).sum(-1)
    ids = np.array([np.lexsort((np.arange(len(xb)), row))[:k] for row in d])
    return np.take_along_axis(d, ids, 1), ids


def test_flat_equals_brute_force(rng):
    xb, xq = clustered(rng, 500), clustered(rng, 20)
    dist, ids = ImageIndex.build(xb, "flat").search(xq, 10)
    want_d, want_i = brute_force(xb, xq, 10)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_allclose(dist, want_d, rtol=1e-4)


def test_ties_go_to_the_lower_id(rng):
    xb = rng.standard_normal((30, 8)).astype(np.float32)
    xb[[3, 17, 25]] = xb[9]  # four identical images
    dist, ids = ImageIndex.build(xb, "flat").search(xb[9:10], 4)
    assert ids.tolist() == [[3, 9, 17, 25]] and np.all(dist == 0)


def test_ivf_recall_against_flat(rng):
    xb, xq = clustered(rng, 4000), clustered(rng, 100)
    ivf = ImageIndex.build(xb, "ivf")
    assert ivf.factory == f"IVF{image_index.ivf_nlist(4000)}"
    _, got = ivf.search(xq, 50)
    _, want = ImageIndex.build(xb, "flat").search(xq, 50)
    recall = np.mean([len(set(g) & set(w)) / 50 for g, w in zip(got, want)])
    assert recall >= IVF_MIN_RECALL_AT_50, recall
    _, one_probe = ivf.search(xq, 50, nprobe=1)
    assert np.all(one_probe >= 0)  # short lists are completed, never -1


def test_nlist_rule():
    assert image_index.ivf_nlist(100) == 2            # clamped to N/39
    assert image_index.ivf_nlist(1_000_000) == 4000   # 4*sqrt(N)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
@pytest.mark.parametrize("sidecar", [False, True])
def test_round_trip_through_a_fresh_file(tmp_path, rng, monkeypatch, kind, sidecar):
    if sidecar:
        monkeypatch.setattr(image_index, "SIDECAR_MIN_BYTES", 0)
    xb, xq = clustered(rng, 2000), clustered(rng, 10)
    cfg = SpadeConfig(backbone="resnet18", crop=64, resize=72)
    store = FeatureStore.create(tmp_path / "c.h5", cfg, {lv: (1, 1, 1) for lv in cfg.levels}, 64)
    idx = ImageIndex.build(xb, kind, nprobe=3)
    idx.save(store)
    store.close()
    assert (tmp_path / "c.faiss").exists() == sidecar
    with FeatureStore.open(tmp_path / "c.h5") as s:
        again = ImageIndex.load(s)
    assert again.ntotal == 2000 and again.nprobe == (3 if kind == "ivf" else None)
    for a, b in zip(idx.search(xq, 7), again.search(xq, 7)):
        np.testing.assert_array_equal(a, b)


def test_add_continues_ids(rng):
    xb = clustered(rng, 100)
    idx = ImageIndex.build(xb[:60], "flat")
    idx.add(xb[60:])
    _, ids = idx.search(xb[80:81], 1)
    assert ids[0, 0] == 80
    with pytest.raises(ValueError, match="k=101"):
        idx.search(xb[:1], 101)
