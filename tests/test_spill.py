"""The spill: entries the gallery cache evicts, written to a private file and read back bitwise,
within its bound, never on a memory file system, and a search that reads them back answers
exactly as one that reads the corpus."""

import logging
import os
import tempfile

import numpy as np
import pytest
import torch

from spade_faiss import datasets
from spade_faiss.detector import Spade
from spade_faiss.galleries import GalleryCache
from spade_faiss.patch_search import bounds, dense
from spade_faiss.spill import Spill, file_system

from .conftest import SMALL, small_disk


def same(a, b) -> bool:
    """Bitwise equality of two entries of any structure the cache holds."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                          b.reshape(-1).view(torch.uint8))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


def entries(rng):
    """What the engines keep per gallery image: pruned (bfloat16 and float32 operands), dense,
    and plain stored rows (float16, an empty level)."""
    feats = rng.standard_normal((5, 7, 24)).astype(np.float16)
    projection = bounds.Projection.fit(feats.reshape(-1, 24).astype(np.float32), 6)
    return [
        {"layer1": bounds.prepare_image(projection, feats, torch.bfloat16)},
        {"layer1": bounds.prepare_image(projection, feats, torch.float32)},
        {"layer2": dense.prepare_image(feats.astype(np.float32))},
        {"layer1": feats, "layer2": np.empty((0, 3), np.float32), "concat": rng.standard_normal((3, 3))},
    ]


def test_entries_come_back_bitwise_and_the_file_is_private(tmp_path, rng):
    spill = Spill(1 << 30, folder=str(tmp_path))
    values = entries(rng)
    for i, v in enumerate(values):
        assert spill.put(("per_level", i), v)
    assert spill.put(("per_level", 0), values[1])  # a key already there is kept, not written again
    assert os.listdir(tmp_path) == []  # unlinked at once: nothing to see, nothing left by a crash
    for i, v in enumerate(values):
        back = spill.get(("per_level", i))
        assert same(v, back), i
    assert spill.writes == len(values) and spill.reads == len(values)
    with pytest.raises(KeyError):
        spill.get(("per_level", 99))
    spill.close()
    assert len(spill) == 0


def test_a_forked_child_neither_reads_nor_writes_its_parents_spill(tmp_path):
    spill = Spill(1 << 20, folder=str(tmp_path))
    assert spill.put(1, {"x": np.arange(10)})
    pid = os.fork()
    if pid == 0:  # the child: the file is its parent's
        os._exit(0 if 1 not in spill and not spill.put(2, {"x": np.zeros(10)}) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert same(spill.get(1), {"x": np.arange(10)}) and 2 not in spill and spill.size == 128


def test_the_bound_is_kept_and_what_does_not_fit_is_dropped(tmp_path):
    value = {"x": np.arange(1000, dtype=np.float32)}  # 4000 bytes: 4032 with alignment
    spill = Spill(10_000, folder=str(tmp_path))
    assert spill.put(1, value) and spill.put(2, value)
    assert not spill.put(3, value) and 3 not in spill and spill.size == 8064 <= spill.max_bytes
    assert same(spill.get(2), value)


def test_no_write_leaves_the_disk_less_than_its_free_reserve(tmp_path, monkeypatch):
    """Several spills (a service's corpora) and other writers share a disk: a write that would
    leave less than KEEP_FREE_BYTES free is not made (the entry is dropped, the spill goes on)."""
    import shutil

    from spade_faiss import spill as spill_module

    free = shutil.disk_usage(tmp_path).free
    spill = Spill(1 << 30, folder=str(tmp_path))
    monkeypatch.setattr(spill_module, "KEEP_FREE_BYTES", free + (1 << 30))  # no room at all
    assert not spill.put(1, {"x": np.zeros(1000, np.float32)}) and 1 not in spill and not spill.off
    monkeypatch.setattr(spill_module, "KEEP_FREE_BYTES", 0)
    assert spill.put(1, {"x": np.zeros(1000, np.float32)}) and 1 in spill


def test_no_spill_on_a_memory_file_system(tmp_path, caplog):
    """A real tmpfs (``small_disk``: mounted for the test, which CI runs as root): the spill
    refuses it, with the warning, and writes nothing there."""
    with small_disk(tmp_path, 4096) as disk:
        assert file_system(str(disk)) == "tmpfs"
        spill = Spill(1 << 30, folder=str(disk))
        with caplog.at_level(logging.WARNING):
            assert not spill.put(1, {"x": np.zeros(10)})
        assert spill.off and "memory file system" in spill.why_off and "tmpfs" in caplog.text
        assert list(disk.iterdir()) == []


def test_a_failed_write_stops_the_spill_and_the_cache_goes_on(tmp_path, caplog):
    loads = []
    spill = Spill(1 << 30, folder=str(tmp_path))
    cache = GalleryCache(lambda keys: loads.extend(keys) or [{"x": np.full(100, k, np.uint8)} for k in keys],
                         max_bytes=150, spill=spill)
    cache.get([1])
    cache.get([2])  # evicts 1: spilled
    assert 1 in spill
    readonly = os.open(tmp_path / "readonly", os.O_RDONLY | os.O_CREAT)
    os.dup2(readonly, spill._fd)  # the file fails under it (as a full disk or a dead device would)
    os.close(readonly)
    with caplog.at_level(logging.WARNING):
        got = cache.get([3])  # evicts 2: the write fails
    assert spill.off and len(spill) == 0 and "not spilled" in caplog.text
    assert got[0]["x"][0] == 3 and cache.get([1])[0]["x"][0] == 1 and loads == [1, 2, 3, 1]


def test_the_cache_reads_evicted_entries_back_instead_of_loading_them(tmp_path):
    loads = []
    cache = GalleryCache(lambda keys: loads.extend(keys) or [{"x": np.full(100, k, np.uint8)} for k in keys],
                         max_bytes=250, spill=Spill(1 << 20, folder=str(tmp_path)))
    for keys in ([1, 2], [3, 4], [1, 2], [5], [3, 1]):
        got = cache.get(keys)
        assert [int(v["x"][0]) for v in got] == keys and all(v["x"].shape == (100,) for v in got)
    assert sorted(loads) == [1, 2, 3, 4, 5]  # each loaded once
    assert cache.misses == 5 and cache.restored == 3 and cache.hits == 1 and cache.nbytes <= 250
    assert cache.hit_rate == 1 / 9


@pytest.fixture(scope="module")
def corpus(dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("spill") / "c.h5"
    Spade.create(path, storage="float16+zstd", k_gallery=6, k_image=3, **SMALL).add(
        [s.path for s in datasets.discover(dataset)])
    return path


def test_scores_read_back_from_the_spill_equal_those_read_from_the_corpus(corpus, dataset, tmp_path,
                                                                       monkeypatch):
    """A cache of one image's bytes: every query's gallery but one is read back from the spill
    (or loaded); the maps, scores and neighbours equal those of a run without a spill, bitwise."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the spill's folder
    queries = [s.path for s in datasets.discover(dataset, "test")] * 2
    runs = {}
    for spill_gb in (0, 1):
        spade = Spade.open(corpus, cache_bytes=1, memory_gb=None, spill_gb=spill_gb)
        runs[spill_gb] = spade.score(queries)
        cache = spade.pipeline_.cache
        assert (cache.spill is None) == (spill_gb == 0)
        if spill_gb:
            assert cache.restored > 0 and cache.misses == len(spade.store_)  # each image read once
        spade.close()
    a, b = runs[0], runs[1]
    np.testing.assert_array_equal(a.maps, b.maps)
    np.testing.assert_array_equal(a.image_scores, b.image_scores)
    np.testing.assert_array_equal(a.neighbour_ids, b.neighbour_ids)
