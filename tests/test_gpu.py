"""The GPU path (faiss-gpu) equals the CPU path. Skipped where faiss has no GPU; run these on a
GPU machine with faiss-gpu installed instead of faiss-cpu."""

import numpy as np
import pytest

from spade_faiss import datasets, patch_search
from spade_faiss.detector import Spade

from .conftest import SMALL

GPU_RTOL = 1e-3
pytestmark = pytest.mark.skipif(not patch_search.gpu_available(), reason="needs faiss-gpu and a GPU")


@pytest.mark.parametrize("kappa", [1, 3])
def test_gpu_knn_mean_equals_cpu(rng, kappa):
    galleries = [rng.standard_normal((500, 64)).astype(np.float32) for _ in range(5)]
    q = rng.standard_normal((300, 64)).astype(np.float32)
    cpu = patch_search.knn_mean(q, patch_search.iter_chunks(galleries, 100_000), kappa, "cpu")
    gpu = patch_search.knn_mean(q, patch_search.iter_chunks(galleries, 100_000), kappa, "cuda")
    np.testing.assert_allclose(gpu, cpu, rtol=GPU_RTOL)


@pytest.mark.parametrize("gpu_float16", [False, True])
def test_gpu_detector_equals_cpu(dataset, gpu_float16):
    train = [s.path for s in datasets.discover(dataset)]
    test = [s.path for s in datasets.discover(dataset, "test")]
    cpu = Spade(k_gallery=6, **SMALL).fit(train).score(test)
    params = dict(SMALL, device="cuda")
    gpu = Spade(k_gallery=6, gpu_float16=gpu_float16, **params).fit(train).score(test)
    np.testing.assert_array_equal(gpu.neighbour_ids, cpu.neighbour_ids)
    np.testing.assert_allclose(gpu.image_scores, cpu.image_scores, rtol=GPU_RTOL)
    np.testing.assert_allclose(gpu.maps, cpu.maps, rtol=GPU_RTOL if not gpu_float16 else 1e-2)


def test_gpu_device_with_correspondences_uses_the_exact_cpu_engine(dataset):
    train = [s.path for s in datasets.discover(dataset)]
    test = [s.path for s in datasets.discover(dataset, "test")]
    cpu = Spade(k_gallery=6, **SMALL).fit(train).score(test, correspondences=True)
    gpu = Spade(k_gallery=6, **dict(SMALL, device="cuda")).fit(train).score(test, correspondences=True)
    # The backbone runs on the GPU (its rounding differs): near-ties may resolve differently.
    for a, b in zip(cpu.correspondences, gpu.correspondences):
        for level in a:
            assert a[level].shape == b[level].shape and (a[level] == b[level]).all(axis=-1).mean() > 0.99
