"""Vision transformers as extractors (issue 38): a DINOv3/DINOv2 ViT through timm, its blocks'
patch tokens as levels, equal to the brute-force oracle like the CNNs; levels, grid and weights
recorded and checked; a local weights file identified by the sha256 of its tensors."""

import os

import numpy as np
import pytest
import torch

from spade_faiss import FeatureStore, datasets
from spade_faiss.backbone import FeatureExtractor, WeightsError, build_model
from spade_faiss.config import SpadeConfig
from spade_faiss.detector import Spade

from .test_detector import oracle

VIT = dict(backbone="vit_small_patch16_dinov3", weights=None, resize=72, crop=64, device="cpu", seed=0)


@pytest.fixture(scope="module")
def vit_fitted(dataset):
    train = [s.path for s in datasets.discover(dataset)]
    return Spade(storage="float32", k_gallery=6, k_image=3, **VIT).fit(train)


@pytest.mark.parametrize("mode, kappa, stage2", [("per_level", 1, "pruned"), ("per_level", 3, "pruned"),
                                                ("concat", 1, "pruned"), ("per_level", 1, "dense"),
                                                ("per_level", 3, "faiss")])
def test_a_vit_corpus_equals_the_brute_force_oracle(vit_fitted, dataset, mode, kappa, stage2):
    spade = vit_fitted.with_params(pixel_mode=mode, kappa=kappa, stage2=stage2)
    queries = [s.path for s in datasets.discover(dataset, "test")]
    r = spade.score(queries)
    s, m, ids, d = oracle(spade, queries, 3, 6, kappa, mode, 4.0)
    np.testing.assert_array_equal(r.neighbour_ids, ids)
    np.testing.assert_allclose(r.image_scores, s, rtol=1e-4)
    assert r.maps.shape == (len(queries), 64, 64)
    assert np.abs(m).max() > 0 and np.ptp(r.image_scores) > 0  # the features tell images apart
    np.testing.assert_allclose(r.maps, m, rtol=1e-4, atol=1e-4 * np.abs(m).max())


def test_the_levels_grid_and_blocks_are_the_vit_s_and_recorded(vit_fitted, tmp_path, dataset):
    assert vit_fitted.config_.levels == ("block03", "block06", "block09", "block11")
    assert vit_fitted.store_.feature_shapes == {lv: (4, 4, 384) for lv in vit_fitted.config_.levels}
    feats = vit_fitted.load_backbone().extractor_(np.zeros((2, 3, 64, 64), np.float32))
    assert sorted(k for k in feats if k != "pool") == [f"block{i:02d}" for i in range(12)]
    assert feats["pool"].shape == (2, 384) and feats["pool"].dtype == np.float32
    # every block's tokens and the embedding are what timm's own model, built independently with
    # the same seed, gives for the same input (block i: after block i, 0-based, final norm
    # applied): equal within 1e-5 (the same operations; stated, not assumed bitwise)
    import timm

    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    feats = vit_fitted.extractor_(x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(VIT["seed"])
        net = timm.create_model("vit_small_patch16_dinov3.lvd1689m", pretrained=False, num_classes=0,
                                dynamic_img_size=True).eval()
    with torch.inference_mode():
        final, blocks = net.forward_intermediates(torch.from_numpy(x), indices=list(range(12)), norm=True)
        pool = net.forward_head(final, pre_logits=True)
    for i, want in enumerate(blocks):
        np.testing.assert_allclose(feats[f"block{i:02d}"], want.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats["pool"], pool.numpy(), rtol=1e-5, atol=1e-5)
    path = tmp_path / "vit.h5"
    train = [s.path for s in datasets.discover(dataset)]
    with Spade.create(path, levels=["block05", "block11"], **VIT) as s:
        s.add(train[:3])
    with FeatureStore.open(path) as store:
        assert store.config.levels == ("block05", "block11") and store.config.backbone == VIT["backbone"]
    with Spade.open(path, k_gallery=2) as again:  # the corpus's own backbone, levels and crop
        assert again.config_.levels == ("block05", "block11") and again.score(train[3:4]).maps.shape == (1, 64, 64)


@pytest.mark.parametrize("change, message", [
    (dict(levels=["layer1"]), "not levels of vit_small_patch16_dinov3"),
    (dict(levels=["block11", "block03"]), "sorted"),
    (dict(crop=60), "multiple of its patch size 16"),
    (dict(storage="compact"), "name one per level"),
    (dict(backbone="resnet18", levels=["block03"]), "not levels of resnet18"),
])
def test_a_configuration_the_backbone_cannot_give_is_refused_in_one_line(change, message):
    with pytest.raises(ValueError, match=message):
        SpadeConfig(**{**{k: v for k, v in VIT.items() if k in ("backbone", "resize", "crop")}, **change})


def test_imagenet_weights_for_a_vit_are_refused_naming_pretrained():
    with pytest.raises(ValueError, match="has no ImageNet weights.*pretrained"):
        Spade(**{**VIT, "weights": "imagenet"}).validate_params()


def test_published_vit_weights_without_network_say_how_to_get_them():
    """In a process without hub access (``HF_HUB_OFFLINE``, read when huggingface_hub loads):
    the error says where the weights come from and how to pass a local file."""
    import subprocess
    import sys

    code = ("from spade_faiss.backbone import build_model\n"
            "build_model('vit_small_patch16_dinov3', 'pretrained')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0 and "WeightsError" in done.stderr
    assert "Hugging Face hub" in done.stderr and "--weights PATH" in done.stderr


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_vit_weights_from_a_local_file_are_identified_by_their_tensors(tmp_path, dataset, suffix):
    other = build_model("vit_small_patch16_dinov3", None, seed=1)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(other.net.state_dict(), path)  # timm's own names, as a hub file has them
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in other.net.state_dict().items()}, str(path))
    from_file = FeatureExtractor("vit_small_patch16_dinov3", str(path), "cpu")
    assert from_file.weights_sha256 == FeatureExtractor("vit_small_patch16_dinov3", None, "cpu", seed=1).weights_sha256
    assert from_file.weights_sha256 != FeatureExtractor("vit_small_patch16_dinov3", None, "cpu", seed=0).weights_sha256
    corpus = tmp_path / "c.h5"
    train = [s.path for s in datasets.discover(dataset)]
    with Spade.create(corpus, **{**VIT, "weights": str(path)}) as s:
        s.add(train[:3])
    with pytest.raises(WeightsError, match="differ from those the corpus was built with"):
        Spade.open(corpus, weights=None, k_gallery=2).score(train[3:4])


def test_a_vit_s_bfloat16_queries_are_its_float32_features_within_bfloat16_rounding(vit_fitted):
    """The fast search's bfloat16 copy of a ViT (no batch norms to fold; cast whole): every block
    and the image embedding within a few bfloat16 roundings of float32's."""
    ext = vit_fitted.load_backbone().extractor_
    x = np.random.default_rng(0).standard_normal((1, 3, vit_fitted.crop, vit_fitted.crop)).astype(np.float32)
    want, got = ext(x), ext(x, compute="bfloat16")
    for lv in want:
        assert got[lv].dtype == np.float32 and got[lv].shape == want[lv].shape
        err = np.linalg.norm(got[lv] - want[lv]) / np.linalg.norm(want[lv])
        assert 1e-4 < err < 0.05, (lv, err)
