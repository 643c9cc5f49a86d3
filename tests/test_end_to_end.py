"""End to end with the real default backbone (wide_resnet50_2 at 224, seeded random init):
the corpus file has SPEC 2's exact shapes, its features equal a plain torchvision forward, and
the command line's scores and maps equal the brute-force SPADE oracle."""

import json
from pathlib import Path

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

from .test_detector import correspondence_oracle, oracle

pytestmark = pytest.mark.slow


def test_default_backbone_corpus_matches_spec_and_direct_forward(tmp_path, dataset, capsys):
    out = tmp_path / "c.h5"
    train = discover(dataset)[:3]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(s.path for s in train))
    assert cli.main(["index", str(lst), "--out", str(out), "--weights", "none", "--device", "cpu",
                     "--storage", "float32"]) == 0
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


MAGNETIC_TILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"


@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="../shared/data/magnetic_tile is not beside the repo")
def test_real_images_pruned_engine_equals_the_oracle_and_faiss_within_its_rounding(tmp_path):
    """Real magnetic_tile images, default backbone: the pruned engine's maps equal the float64
    brute-force oracle to float32 rounding; the faiss engine's (norm expansion in float32)
    differ from the oracle by its own rounding, well within 1e-3 of the map's maximum."""
    train = sorted((MAGNETIC_TILE / "train" / "good").glob("*.png"))[:8]
    test = [sorted((MAGNETIC_TILE / "test" / c).glob("*.png"))[0] for c in ("crack", "good")]
    spade = Spade(weights=None, device="cpu", k_gallery=4, k_image=2, stage2="pruned").fit(train)
    want_scores, want_maps, _, _ = oracle(spade, [str(p) for p in test], 2, 4, 1, "per_level", 4.0)
    for stage2, tolerance in (("pruned", 1e-6), ("faiss", 1e-3)):
        r = spade.with_params(stage2=stage2).score(test)
        np.testing.assert_allclose(r.image_scores, want_scores, rtol=1e-6)
        error = np.abs(r.maps - want_maps).max(axis=(1, 2)) / want_maps.max(axis=(1, 2))
        assert (error < tolerance).all(), (stage2, error)
    stats = spade.pruning_stats_
    assert set(stats) == {"layer1", "layer2", "layer3"} and all(0 < s["pruned"] < 1 for s in stats.values())
    # Correspondences on a real defect image: the brute-force argmin at every level and location.
    r = spade.score(test[:1], correspondences=True)
    want = correspondence_oracle(spade, str(test[0]), r.neighbour_ids[0], spade.config_.levels)
    for level in spade.config_.levels:
        np.testing.assert_array_equal(r.correspondences[0][level], want[level], err_msg=level)
