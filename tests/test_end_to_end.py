"""End to end with the real default backbone (wide_resnet50_2 at 224, seeded random init):
the corpus file has SPEC 2's exact shapes, its features equal a plain torchvision forward, and
the command line's scores and maps equal the brute-force SPADE oracle."""

import json

import h5py
import numpy as np
import pytest
import torch
import torchvision

from spade_faiss import images
from spade_faiss.apps import cli
from spade_faiss.apps.runs import read_rows
from spade_faiss.datasets import discover
from spade_faiss.detector import Spade

from .test_detector import oracle

pytestmark = pytest.mark.slow


def test_default_backbone_corpus_matches_spec_and_direct_forward(tmp_path, dataset, capsys):
    out = tmp_path / "c.h5"
    train = discover(dataset)[:3]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(s.path for s in train))
    assert cli.main(["index", str(lst), "--out", str(out), "--weights", "none", "--device", "cpu",
                     "--dtype", "float32"]) == 0
    capsys.readouterr()
    with h5py.File(out) as h:
        assert h["images/pool"].shape == (3, 2048)
        for lv, shape in {"layer1": (56, 56, 256), "layer2": (28, 28, 512), "layer3": (14, 14, 1024)}.items():
            assert h["levels"][lv].shape == (3, *shape) and h["levels"][lv].chunks == (1, *shape)
        stored = {k: h[k][:] for k in ("images/pool", "levels/layer1", "levels/layer3")}
        assert json.loads(h.attrs["config"])["backbone"] == "wide_resnet50_2"
    torch.manual_seed(0)
    model = torchvision.models.wide_resnet50_2(weights=None).eval()
    x = torch.from_numpy(np.stack([images.preprocess(images.load_image(s.path).rgb) for s in train]))
    with torch.no_grad():
        h0 = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        l1 = model.layer1(h0)
        l3 = model.layer3(model.layer2(l1))
        pool = torch.flatten(model.avgpool(model.layer4(l3)), 1)
    np.testing.assert_allclose(stored["images/pool"], pool.numpy(), rtol=1e-4, atol=1e-4 * pool.abs().max().item())
    np.testing.assert_allclose(stored["levels/layer1"], l1.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stored["levels/layer3"], l3.permute(0, 2, 3, 1).numpy(), rtol=1e-4,
                               atol=1e-4 * l3.abs().max().item())

    code = cli.main(["score", str(out), str(dataset / "test" / "defect"), "--out", str(tmp_path / "run"),
                     "--device", "cpu", "--k-gallery", "3", "--k-image", "2"])
    assert code == 0
    rows = read_rows(tmp_path / "run" / "scores.csv")
    with h5py.File(tmp_path / "run" / "maps.h5") as h:
        maps = h["maps"][:]
    assert maps.shape == (4, 224, 224)
    with Spade.open(out, k_gallery=3, k_image=2) as spade:
        want_scores, want_maps, _, _ = oracle(spade, [r["image_path"] for r in rows], 2, 3, 1, "per_level", 4.0)
    np.testing.assert_allclose([float(r["score"]) for r in rows], want_scores, rtol=1e-5)
    np.testing.assert_allclose(maps, want_maps, rtol=1e-4, atol=1e-5 * want_maps.max())
