"""Flat equals brute force; IVF recall; ties; persistence in the store and in a sidecar."""

import faiss
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


def clustered_split(rng, n, n_queries):
    """Corpus and queries from the same distribution (queries resemble the corpus)."""
    x = clustered(rng, n + n_queries)
    return x[:n], x[n:]


def test_ivf_recall_against_flat(rng):
    xb, xq = clustered_split(rng, 4000, 100)
    ivf = ImageIndex.build(xb, "ivf", target_recall=0.99)
    assert ivf.factory == f"IVF{image_index.ivf_nlist(4000)},Flat"
    _, got = ivf.search(xq, 50)
    _, want = ImageIndex.build(xb, "flat").search(xq, 50)
    recall = np.mean([len(set(g) & set(w)) / 50 for g, w in zip(got, want)])
    assert recall >= IVF_MIN_RECALL_AT_50, recall
    _, one_probe = ivf.search(xq, 50, nprobe=1)
    assert np.all(one_probe >= 0)  # short lists are completed, never -1


def leave_one_out_recall(index, xb, rows, k, nprobe):
    """Recall@k of IVF at ``nprobe`` for corpus vectors ``rows`` as queries, their own row left
    out, against a numpy brute force."""
    d = ((xb[rows, None, :].astype(np.float64) - xb[None].astype(np.float64)) ** 2).sum(-1)
    d[np.arange(len(rows)), rows] = np.inf
    truth = np.argsort(d, axis=1, kind="stable")[:, :k]
    got = index.index.search(xb[rows], k + 1, params=faiss.SearchParametersIVF(nprobe=nprobe))[1]
    got = [g[g != r][:k] for g, r in zip(got, rows)]
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth)])


def test_default_nprobe_is_the_smallest_reaching_the_target_recall(rng):
    xb, xq = clustered_split(rng, 3000, 100)
    ivf = ImageIndex.build(xb, "ivf", target_recall=0.9, k=20)
    assert ivf.nprobe == min(ivf.ivf.nlist, image_index.NPROBE_MARGIN * ivf.tuning["nprobe"])
    assert ivf.tuning["timed_nprobe"] == ivf.nprobe  # auto's IVF-vs-Flat time is taken at the nprobe used
    assert ivf.tuning["target_recall"] == 0.9 and ivf.tuning["k"] == 20
    rows = np.arange(0, 3000, 30)
    tuning = ivf.tune(xb, rows, 0.9, 20)
    p = tuning["nprobe"]
    assert leave_one_out_recall(ivf, xb, rows, 20, p) == pytest.approx(tuning["recall"]) and tuning["recall"] >= 0.9
    assert p == 1 or leave_one_out_recall(ivf, xb, rows, 20, p - 1) < 0.9  # the smallest
    _, got = ivf.search(xq, 20)  # fresh queries from the same distribution
    _, want = brute_force(xb, xq, 20)
    assert np.mean([len(set(g) & set(w)) / 20 for g, w in zip(got, want)]) >= 0.9 - 0.03
    attrs = ivf.attrs()
    assert attrs["nprobe"] == ivf.nprobe and attrs["tuning_recall"] == ivf.tuning["recall"]


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


def test_an_ivf_grown_by_half_is_tuned_again_to_its_target(rng):
    """Appends keep the trained lists; at RETUNE_GROWTH times the tuned size the default
    nprobe is tuned again, and reaches the target recall on the grown index."""
    xb = rng.standard_normal((6000, 16)).astype(np.float32)
    ivf = ImageIndex.build(xb[:2000], "ivf", target_recall=0.95, k=20)
    assert ivf.tuning["images"] == 2000
    ivf.add(xb[2000:2900])
    assert not ivf.retune_due and ivf.tuning["images"] == 2000
    ivf.add(xb[2900:])
    assert ivf.retune_due
    ivf.retune(xb, 0, 0.95, 20)
    assert ivf.tuning["images"] == 6000 and not ivf.retune_due
    rows = np.sort(np.random.default_rng(1).choice(6000, 200, replace=False))
    assert leave_one_out_recall(ivf, xb, rows, 20, ivf.tuning["nprobe"]) >= 0.95
    assert not ImageIndex.build(xb, "flat").retune_due


def test_the_exact_re_ranking_in_chunks_gives_the_same_bits(monkeypatch):
    """Bounded memory (calibration asks 256 queries at once): chunked re-ranking equals one pass."""
    from spade_faiss import image_index

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((300, 64)).astype(np.float32)
    queries = rng.standard_normal((40, 64)).astype(np.float32)
    index = image_index.ImageIndex.build(vectors, "flat")
    whole = index.search(queries, 10)
    monkeypatch.setattr(image_index, "RERANK_BYTES", 64 * 18 * 8 * 3)  # 3 queries per chunk
    chunked = index.search(queries, 10)
    assert all(np.array_equal(a, b) for a, b in zip(whole, chunked))
