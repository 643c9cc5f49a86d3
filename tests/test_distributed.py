"""Ray engine on a real local cluster (ray.init(num_cpus=2)): the distributed build has the same
features per image path as one process, and distributed scoring the same scores and maps."""

import json

import h5py
import numpy as np
import pytest

from spade_faiss.apps import cli
from spade_faiss.apps.runs import RunDir
from spade_faiss.apps.verify import verify
from spade_faiss.datasets import discover
from spade_faiss.detector import Spade
from spade_faiss.store import FeatureStore, StoreError, join_shards

from .conftest import FEAT as FEAT_SMALL
from .conftest import RUN, SMALL

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def one_thread():
    """Ray gives each of the 2 actors 1 CPU, hence 1 torch thread; on some CPUs the backbone's
    bits depend on the thread count, so the local runs compared with them use 1 thread too
    (``--threads 1``, a process-wide setting undone here)."""
    import torch

    before = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(before)


def by_path(store_path):
    with FeatureStore.open(store_path) as s:
        paths = s.paths()
        levels = {lv: s.level(lv, range(len(s))) for lv in s.config.levels}
        return {p: (s.pool()[i], {lv: levels[lv][i] for lv in levels}) for i, p in enumerate(paths)}


@pytest.mark.parametrize("storage", ["float16", "layer1=pca12,layer2=float16+zstd,layer3=pca16"])
def test_ray_build_and_scoring_equal_one_process(cluster, tmp_path, dataset, capsys, one_thread, storage):
    local, dist = tmp_path / "local.h5", tmp_path / "dist.h5"
    FEAT = [*FEAT_SMALL, "--storage", storage]
    assert cli.main(["index", str(dataset), "--out", str(local), *FEAT, *one_thread]) == 0
    # --threads 1 for the driver too: it computes the fit of the stored representations, and the
    # backbone's bits depend on the thread count (the workers run one thread each).
    assert cli.main(["index", str(dataset), "--out", str(dist), *FEAT, "--backend", "ray", "--ray-workers", "2",
                     "--batch-size", "2", *one_thread]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(out)["images"] == 12 and json.loads(out)["shards"] in (1, 2)
    a, b = by_path(local), by_path(dist)
    assert sorted(a) == sorted(b)
    for p in a:
        np.testing.assert_array_equal(a[p][0], b[p][0])
        for lv in a[p][1]:
            np.testing.assert_array_equal(a[p][1][lv], b[p][1][lv])
    with h5py.File(dist) as h:
        assert h["levels/layer1"].is_virtual and h["images/pool"].shape == (12, 512)
    assert sorted(p.name for p in dist.with_suffix(".shards").iterdir() if not p.name.startswith("shard-")) == []
    assert verify(dist, deep=True) == []
    with FeatureStore.open(dist, "a") as s, pytest.raises(StoreError, match="cannot grow"):
        s.append(["x"], ["0" * 64], {})

    assert cli.main(["score", str(local), str(dataset), "--out", str(tmp_path / "r1"), *RUN, "--k-gallery", "4",
                     "--no-overlays", *one_thread]) == 0
    assert cli.main(["score", str(dist), str(dataset), "--out", str(tmp_path / "r2"), *RUN, "--k-gallery", "4",
                     "--backend", "ray", "--ray-workers", "2", "--batch-size", "2", "--no-overlays"]) == 0
    capsys.readouterr()
    # The same run layout as the local engine: one scores.csv, one maps.h5, the same numbers.
    assert sorted(p.name for p in (tmp_path / "r2").iterdir()) == ["maps.h5", "report.html", "run.json", "scores.csv"]
    one, many = RunDir(tmp_path / "r1").score_rows(), RunDir(tmp_path / "r2").score_rows()
    assert [r["image_path"] for r in one] == [r["image_path"] for r in many]
    for x, y in zip(one, many):
        assert x["score"] == y["score"] and x["map_max"] == y["map_max"]
        assert x["neighbour_paths"].split(";") == y["neighbour_paths"].split(";")
    with h5py.File(tmp_path / "r1" / "maps.h5") as a, h5py.File(tmp_path / "r2" / "maps.h5") as b:
        assert list(a["path"][:]) == list(b["path"][:])
        np.testing.assert_array_equal(a["maps"][:], b["maps"][:])
    # Resume: nothing left to do.
    assert cli.main(["score", str(dist), str(dataset), "--out", str(tmp_path / "r2"), *RUN, "--k-gallery", "4",
                     "--backend", "ray", "--no-overlays"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped_done"] == 7


def test_join_shards_maps_rows_across_files_and_dedupes(tmp_path, dataset):
    train = discover(dataset)
    parts = [train[:5], train[4:9], train[9:]]  # image 4 is in two shards
    shards = []
    for i, part in enumerate(parts):
        shards.append(str(tmp_path / "shards" / f"s{i}.h5"))
        with Spade.create(shards[-1], **SMALL) as s:
            s.add(part)
    with Spade.create(tmp_path / "local.h5", **SMALL) as s:
        s.add(train)
    assert join_shards(shards, str(tmp_path / "joined.h5")) == 12
    with Spade.open(tmp_path / "joined.h5", "a") as s:  # weights and features from the shards
        assert s.reindex()["ntotal"] == 12 and s.weights is None
    a, b = by_path(tmp_path / "local.h5"), by_path(tmp_path / "joined.h5")
    assert sorted(a) == sorted(b)
    for p in a:
        for lv in a[p][1]:
            np.testing.assert_array_equal(a[p][1][lv], b[p][1][lv])
    # The corpus and its shards move together (relative virtual sources).
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "joined.h5").rename(moved / "joined.h5")
    (tmp_path / "shards").rename(moved / "shards")
    assert verify(moved / "joined.h5", deep=True) == []
