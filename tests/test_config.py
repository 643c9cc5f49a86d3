import pytest

from spade_faiss.config import SpadeConfig, feature_mismatch


def test_defaults_follow_spec():
    c = SpadeConfig()
    assert (c.backbone, c.resize, c.crop, c.levels, c.dtype) == \
        ("wide_resnet50_2", 256, 224, ("layer1", "layer2", "layer3"), "float16")
    assert (c.k_image, c.k_gallery, c.kappa, c.pixel_mode, c.sigma) == (5, 50, 1, "per_level", 4.0)


def test_json_round_trip():
    c = SpadeConfig(backbone="resnet18", crop=64, resize=72, levels=("layer1", "layer3"), kappa=3, nprobe=4)
    assert SpadeConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize("bad, word", [
    (dict(backbone="vgg"), "backbone"), (dict(crop=300), "crop"), (dict(k_image=60), "k_image"),
    (dict(kappa=0), "kappa"), (dict(levels=("layer4",)), "levels"), (dict(levels=("layer2", "layer1")), "levels"),
    (dict(pixel_mode="x"), "pixel_mode"), (dict(sigma=-1), "sigma"), (dict(dtype="int8"), "dtype"),
    (dict(pixel_mode="concat", levels=("layer2", "layer3")), "concat"), (dict(k_gallery=True), "k_gallery"),
])
def test_bad_values_name_the_parameter(bad, word):
    with pytest.raises(ValueError, match=word):
        SpadeConfig(**bad)


def test_feature_mismatch_names_both_values():
    a = SpadeConfig().feature_dict()
    b = SpadeConfig(crop=200).feature_dict()
    assert feature_mismatch(a, b) == ["crop: store has 224, requested 200"]
    assert feature_mismatch(a, a) == []
