"""Features equal a direct torchvision forward, bit for bit; weights resolution and its errors."""

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from spade_faiss import backbone
from spade_faiss.backbone import FeatureExtractor, WeightsError
from spade_faiss.config import CNN_BACKBONES


def _direct_forward(model, x):
    # Written out from torchvision's ResNet.forward, independent of create_feature_extractor.
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(torch.from_numpy(x)))))
        l1 = model.layer1(h)
        l2 = model.layer2(l1)
        l3 = model.layer3(l2)
        pool = torch.flatten(model.avgpool(model.layer4(l3)), 1)
    return {"layer1": l1, "layer2": l2, "layer3": l3, "pool": pool}


def _seeded_model(name, seed):
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None).eval()


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2"])
def test_features_are_torchvision_s_bit_for_bit(rng, name):
    """Our own modules (resnets.py) hold torchvision's state_dict names and compute its
    features exactly, image by image."""
    ext = FeatureExtractor(name, weights=None, device="cpu", seed=3)
    model = _seeded_model(name, 3)
    assert sorted(ext.model.state_dict()) == sorted(model.state_dict())
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    got = ext(x)
    for i in range(2):
        want = _direct_forward(model, x[i:i + 1])
        for lv in ("layer1", "layer2", "layer3"):
            assert got[lv][i:i + 1].shape == tuple(want[lv].permute(0, 2, 3, 1).shape)  # channels-last
            np.testing.assert_array_equal(got[lv][i:i + 1], want[lv].permute(0, 2, 3, 1).numpy())
        np.testing.assert_array_equal(got["pool"][i:i + 1], want["pool"].numpy())


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = FeatureExtractor("resnet18", weights=None, device="cpu", seed=0)
    after = torch.rand(1)
    assert before == after
    assert a.weights_sha256 == FeatureExtractor("resnet18", weights=None, device="cpu", seed=0).weights_sha256
    assert a.weights_sha256 != FeatureExtractor("resnet18", weights=None, device="cpu", seed=1).weights_sha256


def test_local_state_dict_file_gives_the_same_identity(tmp_path):
    model = _seeded_model("resnet18", 7)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    ext = FeatureExtractor("resnet18", weights=str(tmp_path / "w.pth"), device="cpu")
    assert ext.weights_sha256 == backbone.state_dict_sha256(model)
    # Built on the meta device and given the file's tensors: the same features, bit for bit.
    seeded = FeatureExtractor("resnet18", weights=None, device="cpu", seed=7)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    a, b = ext(x), seeded(x)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not any(t.is_meta for t in ext.model.parameters())


def test_weights_missing_a_buffer_are_refused(tmp_path):
    state = _seeded_model("resnet18", 0).state_dict()
    del state["bn1.running_mean"]
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="running_mean"):
        FeatureExtractor("resnet18", weights=str(tmp_path / "w.pth"), device="cpu")


def test_weights_that_do_not_fit_are_refused(tmp_path):
    torch.save(_seeded_model("resnet18", 0).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="do not fit backbone resnet50"):
        FeatureExtractor("resnet50", weights=str(tmp_path / "r18.pth"), device="cpu")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="junk.pth: not a loadable"):
        FeatureExtractor("resnet18", weights=str(tmp_path / "junk.pth"), device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        FeatureExtractor("resnet18", weights=str(tmp_path / "missing.pth"), device="cpu")


def test_unknown_backbone_and_device():
    with pytest.raises(ValueError, match="backbone='vgg16'"):
        FeatureExtractor("vgg16", weights=None, device="cpu")
    with pytest.raises(ValueError, match="device='tpu'"):
        backbone.resolve_device("tpu")


def test_imagenet_failure_says_how_to_pass_a_local_file(monkeypatch, tmp_path):
    # The download itself is the network boundary: make it fail as it does without network.
    def offline(*a, **k):
        raise OSError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as e:
        backbone.load_state_dict("resnet18", "imagenet")
    msg = str(e.value)
    assert "weights=PATH" in msg and "--weights PATH" in msg
    assert str(tmp_path) in msg and "resnet18-f37072fd.pth" in msg


@pytest.mark.parametrize("name", CNN_BACKBONES)
def test_the_seeded_random_init_is_torchvisions_bit_for_bit(name):
    """The identity of every random-init corpus: drawn without torchvision, the same tensors
    (names, dtypes, bits) as its constructor draws from the same seed."""
    from spade_faiss.resnets import random_init

    torch.manual_seed(5)
    ours = random_init(name)
    torch.manual_seed(5)
    theirs = torchvision.models.get_model(name, weights=None).state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)


def test_imagenet_weights_are_torchvisions_v1_files_from_the_hub_cache(monkeypatch, tmp_path):
    """The URL table is torchvision's registry (IMAGENET1K_V1) for every CNN, and the file in the
    hub cache is what a model loads, in a process that never imports torchvision (nor does a
    random init)."""
    for name in backbone.IMAGENET_URLS:
        assert backbone.IMAGENET_URLS[name] == torchvision.models.get_model_weights(name).IMAGENET1K_V1.url
    assert set(backbone.IMAGENET_URLS) == set(CNN_BACKBONES)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = backbone.imagenet_cache_path("resnet18")
    assert cached == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    state = FeatureExtractor("resnet18", weights=None, device="cpu", seed=3).model.state_dict()
    torch.save(state, cached)  # stands for the published file (the download is the network boundary)
    code = ("import sys; from spade_faiss.backbone import FeatureExtractor; "
            "e = FeatureExtractor('resnet18', 'imagenet', 'cpu'); "
            "r = FeatureExtractor('resnet18', None, 'cpu', seed=3); "
            "print(e.weights_sha256, r.weights_sha256, 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TORCH_HOME": str(tmp_path)}).stdout.split()
    random_init = FeatureExtractor("resnet18", weights=None, device="cpu", seed=3).weights_sha256
    assert out == [random_init, random_init, "False"]  # neither ImageNet weights nor a random init import it


def test_float16_levels_are_the_rounded_float32_levels(rng):
    ext = FeatureExtractor("resnet18", weights=None, device="cpu")
    x = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    a, b = ext(x), ext(x, "float16")
    for lv in ("layer1", "layer2", "layer3"):
        assert b[lv].dtype == np.float16
        np.testing.assert_array_equal(b[lv], a[lv].astype(np.float16))
    np.testing.assert_array_equal(a["pool"], b["pool"])


def _trained_like_batchnorms(model, seed):
    """Batch norms with the spread of trained ones (a random init's are the identity, which
    folding could not get wrong)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g)
            m.bias.data = 0.2 * torch.randn(n, generator=g)
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_folded_batchnorms_compute_the_same_function(rng, name):
    """``ResNet.fold_batchnorm`` (the bfloat16 copy's first step) against the unfolded module,
    both float32: equal up to float32 rounding, and every batch norm is gone."""
    ext = FeatureExtractor(name, weights=None, device="cpu", seed=2)
    _trained_like_batchnorms(ext.model, 5)
    x = torch.from_numpy(rng.standard_normal((1, 3, 64, 64)).astype(np.float32))
    with torch.inference_mode():
        want = ext.model(x)
        folded = copy.deepcopy(ext.model).fold_batchnorm()
        got = folded(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    for lv in ("layer1", "layer2", "layer3", "pool"):
        err = float((got[lv] - want[lv]).norm() / want[lv].norm())
        assert err < 1e-5, (lv, err)


def test_bfloat16_compute_is_float32_s_features_within_bfloat16_rounding(rng):
    """The fast search's queries (``compute="bfloat16"``): the same features as float32 up to a
    relative difference of a few bfloat16 roundings (2^-8 each), in the float32 layout; the
    float32 model is left as it was."""
    ext = FeatureExtractor("resnet50", weights=None, device="cpu", seed=2)
    _trained_like_batchnorms(ext.model, 6)
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    want = ext(x)
    got = ext(x, compute="bfloat16")
    for lv in ("layer1", "layer2", "layer3", "pool"):
        assert got[lv].dtype == np.float32 and got[lv].shape == want[lv].shape
        err = np.linalg.norm(got[lv] - want[lv]) / np.linalg.norm(want[lv])
        assert 1e-4 < err < 0.05, (lv, err)  # rounded, yet the same function
    again = ext(x)
    for lv in want:
        np.testing.assert_array_equal(again[lv], want[lv])
    with pytest.raises(ValueError, match="compute='float16'"):
        ext(x, compute="float16")


def test_only_the_fast_search_computes_queries_in_bfloat16(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for search in ("exact", "window"):
        assert backbone.query_compute(search, cpu) == backbone.query_compute(search, cuda) == "float32"
    assert backbone.query_compute("fast", cuda) == "bfloat16"
    from spade_faiss.patch_search import bounds

    for operand in ("float32", "bfloat16"):
        monkeypatch.setattr(bounds, "operand_dtype", lambda o=operand: getattr(torch, o))
        assert backbone.query_compute("fast", cpu) == operand


class _Counted(torch.nn.Module):
    """A model's stand-in that counts forwards and their batch sizes; ``skew`` adds a value that
    depends on the batch size (a kernel chosen by batch shape with another summation order)."""

    def __init__(self, inner, skew=0.0):
        super().__init__()
        self.inner, self.skew, self.sizes = inner, skew, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        out = self.inner(x)
        return {k: v + self.skew * (x.shape[0] - 1) for k, v in out.items()}


class _Imagewise(torch.nn.Module):
    """Levels computed pixel by pixel (no sums): any batch gives each image what it gets alone."""

    def forward(self, x):
        return {"layer1": 2 * x + 1, "layer2": x[:, :, ::2, ::2] ** 2, "layer3": torch.tanh(x[:, :, ::4, ::4]),
                "pool": x[:, :, 0, 0]}


def _alone(ext, x):
    parts = [ext(x[i:i + 1]) for i in range(len(x))]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_batches_run_together_once_proven_bitwise_and_images_alone_otherwise(rng):
    """The first batch of a shape runs image by image (its results) and then together (the
    proof); a proven shape then takes one forward per ``FORWARD_BATCH`` images, a refuted one
    stays image by image. Either way every image's features are bitwise those it gets alone."""
    x = rng.standard_normal((9, 3, 64, 64)).astype(np.float32)
    ext = FeatureExtractor("resnet18", weights=None, device="cpu", seed=1)
    ext.model = _Imagewise()
    want = _alone(ext, x)  # batches of one: never proven, never batched
    # batched forwards exactly the images': proven, then batched
    ext.model = counted = _Counted(_Imagewise())
    got = ext(x)
    assert counted.sizes == [1, 1, 1, 1, 4, 4, 1]  # 4 alone and their proof, 4 together, the 9th alone
    assert ext(x) and counted.sizes[7:] == [4, 4, 1]
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    # a model whose batched forwards differ: refuted, image by image from then on
    ext = FeatureExtractor("resnet18", weights=None, device="cpu", seed=1)
    ext.model = skewed = _Counted(_Imagewise(), skew=1e-3)
    got = ext(x)
    assert skewed.sizes == [1, 1, 1, 1, 4] + [1] * 5
    assert ext(x) and skewed.sizes[10:] == [1] * 9
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_constant_images_prove_nothing(rng):
    """A batch of constant images cannot show another summation order: no verdict, the next
    batch of that shape is the proof."""
    ext = FeatureExtractor("resnet18", weights=None, device="cpu", seed=1)
    ext.model = counted = _Counted(_Imagewise())
    ext(np.zeros((4, 3, 64, 64), np.float32))
    assert counted.sizes == [1, 1, 1, 1] and not ext._batch_proven
    ext(rng.standard_normal((4, 3, 64, 64)).astype(np.float32))
    assert counted.sizes[4:] == [1, 1, 1, 1, 4] and list(ext._batch_proven.values()) == [True]


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("wide_resnet50_2", 96), ("wide_resnet50_2", 224)])
def test_a_real_model_s_batches_are_the_images_alone(rng, name, size):
    """Whatever this machine's kernels decide (resnet18 at 64 px: refuted on a Xeon with AMX,
    where a batch of four sums in another order), batches of a real ResNet's forwards give each
    image its features alone, bit for bit."""
    ext = FeatureExtractor(name, weights=None, device="cpu", seed=0)
    x = rng.standard_normal((6, 3, size, size)).astype(np.float32)
    ext(x)  # the proof
    got, want = ext(x), _alone(ext, x)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
