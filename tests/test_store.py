"""The HDF5 file matches SPEC 2 exactly; appends commit last; configs are checked."""

import hashlib
import json
import os

import h5py
import numpy as np
import pytest

from spade_faiss.config import SpadeConfig
from spade_faiss.store import FeatureStore, StoreError

SHAPES = {"layer1": (8, 8, 4), "layer2": (4, 4, 6), "layer3": (2, 2, 8)}


def _feats(rng, b, dtype=np.float32):
    f = {lv: rng.standard_normal((b, *s)).astype(dtype) for lv, s in SHAPES.items()}
    f["pool"] = rng.standard_normal((b, 16)).astype(np.float32)
    return f


def _create(tmp_path, dtype="float16"):
    cfg = SpadeConfig(backbone="resnet18", weights_sha256="ab" * 32, resize=72, crop=64, storage=dtype)
    return FeatureStore.create(tmp_path / "c.h5", cfg, SHAPES, 16), cfg


def test_layout_matches_spec(tmp_path, rng):
    store, cfg = _create(tmp_path)
    f = _feats(rng, 3)
    store.append(["a.png", "b/ü.png", "c.png"], ["0" * 64, "1" * 64, "2" * 64], f)
    store.close()
    with h5py.File(tmp_path / "c.h5", "r") as h:
        a = h.attrs
        assert a["format_version"] == 2 and a["n_committed"] == 3 and a["library_version"]
        assert json.loads(a["feature_shapes"]) == {lv: list(s) for lv, s in SHAPES.items()}
        assert a["created"].endswith("+00:00")
        assert json.loads(a["config"]) == cfg.feature_dict()
        assert h["images/path"].dtype.kind == "O" and h["images/path"].shape == (3,)
        assert h["images/path"][1].decode() == "b/ü.png"
        assert h["images/sha256"].shape == (3,)
        assert h["images/pool"].dtype == np.float32 and h["images/pool"].shape == (3, 16)
        # chunks of many images' rows are rewritten in place by every append: no chunk checksum
        # there (a torn rewrite would break it: test_a_torn_chunk_rewrite_loses_no_committed_row)
        assert not any(h[name].fletcher32 for name in ("images/pool", "images/sha256", "digests/pool"))
        for part in ("pool", "names", *SHAPES):  # the sha256 of each image's stored bytes, per part
            assert h[f"digests/{part}"].shape == (3, 32) and h[f"digests/{part}"].dtype == np.uint8
        assert bytes(h["digests/names"][1]) == hashlib.sha256("b/ü.png".encode() + b"\0" + b"1" * 64).digest()
        assert bytes(h["digests/layer1"][1]) == hashlib.sha256(h["levels/layer1"][1].tobytes()).digest()
        for lv, s in SHAPES.items():
            d = h["levels"][lv]
            assert d.shape == (3, *s) and d.dtype == np.float16 and d.chunks == (1, *s)
            assert d.maxshape == (None, *s) and d.fletcher32  # a checksum on every chunk
            np.testing.assert_array_equal(d[:], f[lv].astype(np.float16))
        assert "index" in h


def test_round_trip_float32_exact(tmp_path, rng):
    store, _ = _create(tmp_path, "float32")
    f = _feats(rng, 4)
    store.append(list("abcd"), [c * 64 for c in "0123"], f)
    store.close()
    with FeatureStore.open(tmp_path / "c.h5") as s:
        assert len(s) == 4 and s.paths() == list("abcd") and s.sha256s()[2] == "2" * 64
        np.testing.assert_array_equal(s.pool(), f["pool"])
        np.testing.assert_array_equal(s.level("layer2", [3, 0, 2]), f["layer2"][[3, 0, 2]])
        with pytest.raises(IndexError):
            s.level("layer1", [4])


def test_rows_past_n_committed_are_ignored_and_overwritten(tmp_path, rng):
    store, _ = _create(tmp_path, "float32")
    store.append(["a"], ["0" * 64], _feats(rng, 1))
    # Simulate a crash after the rows were written but before the commit.
    for name in ("images/path", "images/sha256", "images/pool", "levels/layer1", "levels/layer2", "levels/layer3"):
        store.h5[name].resize(3, axis=0)
    store.h5["images/path"][1:3] = ["garbage1", "garbage2"]
    store.close()
    s = FeatureStore.open(tmp_path / "c.h5", "a")
    assert len(s) == 1 and s.paths() == ["a"]
    f = _feats(rng, 1)
    s.append(["b"], ["1" * 64], f)
    assert s.paths() == ["a", "b"]
    np.testing.assert_array_equal(s.pool(1), f["pool"])
    s.close()


def test_other_config_is_refused_naming_both(tmp_path):
    store, cfg = _create(tmp_path)
    with pytest.raises(StoreError, match=r"resize: store has 72, requested 40; crop: store has 64, requested 32"):
        store.check_config(cfg.replace(crop=32, resize=40))
    store.close()


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        FeatureStore.open(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(StoreError, match="junk.h5: not a readable HDF5"):
        FeatureStore.open(tmp_path / "junk.h5")
    store, _ = _create(tmp_path)
    store.close()
    with h5py.File(tmp_path / "c.h5", "a") as h:
        del h["levels/layer2"]
    with pytest.raises(StoreError, match="missing dataset 'levels/layer2'"):
        FeatureStore.open(tmp_path / "c.h5")
    with h5py.File(tmp_path / "plain.h5", "w"):
        pass
    with pytest.raises(StoreError, match="not a spade_faiss corpus"):
        FeatureStore.open(tmp_path / "plain.h5")


def test_a_corpus_whose_writer_died_is_rewritten_from_its_committed_rows(tmp_path, caplog):
    cfg = SpadeConfig(backbone="resnet18", crop=64, resize=72, weights_sha256="x" * 64)
    shapes = {"layer1": (2, 2, 3), "layer2": (1, 1, 4), "layer3": (1, 1, 5)}
    path = tmp_path / "c.h5"
    rng = np.random.default_rng(0)

    def feats(b):
        return {"pool": rng.standard_normal((b, 6), dtype=np.float32),
                **{lv: rng.standard_normal((b, *s), dtype=np.float32).astype(np.float16) for lv, s in shapes.items()}}
    with FeatureStore.create(path, cfg, shapes, 6) as s:
        s.append(["a", "b"], ["0" * 64, "1" * 64], feats(2))
        want = s.pool(), s.level("layer1", [0, 1])
    with h5py.File(path, "a") as h:  # as if a writer died mid-append: marked, rows past n_committed
        h.attrs["writer"] = 1
        for name in ("images/path", "images/sha256", "images/pool", "levels/layer1", "levels/layer2", "levels/layer3"):
            h[name].resize(3, axis=0)
    with FeatureStore.open(path) as s:  # readers are unaffected
        assert len(s) == 2 and s.attrs["writer"] == 1
    with caplog.at_level("WARNING"), FeatureStore.open(path, "a") as s:
        assert len(s) == 2 and s.h5["images/pool"].shape[0] == 2 and s.attrs["writer"] == 1
        np.testing.assert_array_equal(s.pool(), want[0])
        np.testing.assert_array_equal(s.level("layer1", [0, 1]), want[1])
        s.append(["c"], ["2" * 64], feats(1))
        assert s.paths() == ["a", "b", "c"]
    assert "did not close it" in caplog.text
    with FeatureStore.open(path) as s:
        assert s.attrs["writer"] == 0 and len(s) == 3


def test_a_killed_writer_s_temporary_is_removed_by_the_next_one_and_a_live_one_s_is_kept(tmp_path):
    import subprocess

    from spade_faiss.store import names

    dst = tmp_path / "c.h5"
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = tmp_path / f"c.h5.tmp-{dead.pid}"  # a writer that is gone
    left.write_bytes(b"\x89HDF half")
    live = tmp_path / f"c.h5.tmp-{os.getppid()}"  # a writer still running (our parent)
    live.write_bytes(b"\x89HDF busy")
    assert names.abandoned_temporaries(dst) == [str(left)]
    FeatureStore.create(dst, SpadeConfig(levels=("layer1",), storage="float16"), {"layer1": (2, 2, 4)}, 8).close()
    assert not left.exists() and live.exists()


SHARED = ("images/sha256", "images/pool", "digests/pool", "digests/names", "digests/layer1")


def _legacy_checksums(path):
    """Give an empty corpus the layout of 0.3.1 and before: fletcher32 on the chunks of many rows."""
    with h5py.File(path, "r+") as h:
        for name in SHARED[:-2] + ("digests/layer1",):
            ds = h[name]
            spec = dict(shape=ds.shape, maxshape=ds.maxshape, dtype=ds.dtype, chunks=ds.chunks)
            del h[name]
            h.create_dataset(name, fletcher32=True, **spec)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_torn_chunk_rewrite_loses_no_committed_row(tmp_path, rng, legacy):
    """An append rewrites in place each chunk that holds committed rows and new ones; SIGKILL can
    stop that write between pages (the kernel checks for it per page), leaving the new bytes
    up to a page boundary and the old after it. Committed bytes are the same in both, so every
    committed row must read as written: in the layout of 0.3.2 directly (no chunk checksum on
    such chunks), in a corpus of 0.3.1 (fletcher32 there: the torn chunk fails it) after the
    next writer's rebuild. The tear is made exactly: the file before the append's writes, with
    the page-aligned prefix of each shared chunk taken from the file after them."""
    store, _ = _create(tmp_path)
    store.close()
    if legacy:
        _legacy_checksums(tmp_path / "c.h5")
    store = FeatureStore.open(tmp_path / "c.h5", "a")
    first = _feats(rng, 3)
    store.append(["a.png", "b.png", "c.png"], ["0" * 64, "1" * 64, "2" * 64], first)
    before = (tmp_path / "c.h5").read_bytes()  # committed, writer still open: as a crash finds it
    store.append(["d.png", "e.png"], ["3" * 64, "4" * 64], _feats(rng, 2))
    store.close()
    after = (tmp_path / "c.h5").read_bytes()
    torn = bytearray(before)
    with h5py.File(tmp_path / "c.h5", "r") as h:
        for name in SHARED if not legacy else SHARED[:-2]:
            info = h[name].id.get_chunk_info(0)
            row_bytes = h[name].dtype.itemsize * int(np.prod(h[name].shape[1:]))
            end = ((info.byte_offset + 5 * row_bytes) // 4096 + 1) * 4096  # the new rows' page, then stop
            assert end < info.byte_offset + info.size  # the chunk's tail (its checksum) stays old
            torn[info.byte_offset:end] = after[info.byte_offset:end]
    assert bytes(torn) != before
    (tmp_path / "torn.h5").write_bytes(bytes(torn))
    with h5py.File(tmp_path / "torn.h5", "r") as t, h5py.File(tmp_path / "c.h5", "r") as h:
        for name in SHARED if not legacy else SHARED[:-2]:  # the premise: rewritten in place, not moved
            assert t[name].id.get_chunk_info(0).byte_offset == h[name].id.get_chunk_info(0).byte_offset

    def committed_rows_read(store):
        assert len(store) == 3 and store.paths() == ["a.png", "b.png", "c.png"]
        assert store.sha256s() == ["0" * 64, "1" * 64, "2" * 64] and store.mismatched_names() == []
        np.testing.assert_array_equal(store.pool(), first["pool"])
        np.testing.assert_array_equal(store.level("layer1", [0, 1, 2]), first["layer1"].astype(np.float16))

    if not legacy:
        with FeatureStore.open(tmp_path / "torn.h5") as s:
            assert s.last_writer_died
            committed_rows_read(s)
    else:
        with FeatureStore.open(tmp_path / "torn.h5") as s, pytest.raises(StoreError, match="cannot be read"):
            s.pool()  # the chunk checksum no longer matches
    with FeatureStore.open(tmp_path / "torn.h5", "a") as s:  # the next writer rebuilds from the committed rows
        committed_rows_read(s)
