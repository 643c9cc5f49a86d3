"""Chunked exact patch kNN equals a brute-force oracle for any chunking and kappa."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spade_faiss import patch_search
from spade_faiss.resample import concat_levels


def oracle_knn_mean(q, g, kappa):
    d = torch.cdist(torch.from_numpy(q).double(), torch.from_numpy(g).double()) ** 2
    return d.topk(kappa, dim=1, largest=False).values.mean(1).numpy()


@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize("chunk_bytes", [1, 4000, 10**9])
def test_knn_mean_equals_brute_force(rng, kappa, chunk_bytes):
    galleries = [rng.standard_normal((rng.integers(5, 40), 16)).astype(np.float32) for _ in range(7)]
    q = rng.standard_normal((50, 16)).astype(np.float32)
    got = patch_search.knn_mean(q, patch_search.iter_chunks(galleries, chunk_bytes), kappa)
    np.testing.assert_allclose(got, oracle_knn_mean(q, np.concatenate(galleries), kappa), rtol=1e-4)


def test_kappa_larger_than_every_chunk(rng):
    galleries = [rng.standard_normal((2, 4)).astype(np.float32) for _ in range(5)]
    q = rng.standard_normal((6, 4)).astype(np.float32)
    got = patch_search.knn_mean(q, patch_search.iter_chunks(galleries, 1), 7)
    np.testing.assert_allclose(got, oracle_knn_mean(q, np.concatenate(galleries), 7), rtol=1e-4)
    with pytest.raises(ValueError, match="kappa=11 needs at least 11"):
        patch_search.knn_mean(q, patch_search.iter_chunks(galleries, 1), 11)


def test_chunks_respect_the_byte_bound_and_cast(rng):
    galleries = [rng.standard_normal((3, 3, 8)).astype(np.float16) for _ in range(10)]
    chunks = list(patch_search.iter_chunks(galleries, 9 * 8 * 4 * 3))
    assert [c.shape[0] for c in chunks] == [27, 27, 27, 9]
    assert all(c.dtype == np.float32 for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), np.concatenate([g.reshape(-1, 8) for g in galleries]))


def test_level_maps_shape_and_zero_on_self(rng):
    g = [rng.standard_normal((4, 5, 8)).astype(np.float32) for _ in range(3)]
    maps = patch_search.level_maps(np.stack([g[1], g[2]]), g, kappa=1)
    assert maps.shape == (2, 4, 5)
    np.testing.assert_allclose(maps, 0, atol=1e-4)


def test_concat_levels_equals_torch_interpolate(rng):
    l1 = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    l2 = rng.standard_normal((2, 4, 4, 5)).astype(np.float32)
    got = concat_levels([l1, l2])
    up = F.interpolate(torch.from_numpy(l2).permute(0, 3, 1, 2), size=(8, 8), mode="bilinear", align_corners=False)
    want = np.concatenate([l1, up.permute(0, 2, 3, 1).numpy()], axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_devices():
    assert patch_search.resolve_search_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="device='tpu'"):
        patch_search.resolve_search_device("tpu")
    if not patch_search.gpu_available():
        assert patch_search.resolve_search_device("auto") == "cpu"
        with pytest.raises(ValueError, match="faiss-gpu"):
            patch_search.resolve_search_device("cuda")


def test_out_of_memory_splits_the_chunk_and_stays_exact(rng, monkeypatch):
    # Stand-in for a GPU (or RAM) allocation failure above a size, around the real faiss search.
    real = patch_search._knn

    def small_memory(q, g, k, device):
        if g.shape[0] > 30:
            raise RuntimeError("Error in virtual void* faiss::gpu::StandardGpuResourcesImpl: cudaMalloc: out of memory")
        return real(q, g, k, device)
    monkeypatch.setattr(patch_search, "_knn", small_memory)
    galleries = [rng.standard_normal((50, 8)).astype(np.float32) for _ in range(3)]
    q = rng.standard_normal((20, 8)).astype(np.float32)
    for kappa in (1, 4):
        got = patch_search.knn_mean(q, patch_search.iter_chunks(galleries, 10**9), kappa)
        np.testing.assert_allclose(got, oracle_knn_mean(q, np.concatenate(galleries), kappa), rtol=1e-4)
    monkeypatch.setattr(patch_search, "_knn", lambda *a: (_ for _ in ()).throw(RuntimeError("other failure")))
    with pytest.raises(RuntimeError, match="other failure"):
        patch_search.knn_mean(q, patch_search.iter_chunks(galleries, 10**9), 1)
