"""A corpus grows while it is read: appends beside it (segments), readers that catch up, the
merge, thresholds calibrated meanwhile; scores bitwise those of a corpus built at once."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from spade_faiss import Spade
from spade_faiss.datasets import discover
from spade_faiss.store import FeatureStore, appends
from spade_faiss.synthetic import make_dataset

from .conftest import SMALL


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("grow") / "tile", n_train=20, n_good=2, n_defect=2, size=(80, 80),
                        seed=3)
    train = [s.path for s in discover(root, "train")]
    return train, [s.path for s in discover(root, "test")]


def scores(spade, test):
    r = spade.score(test)
    return r.image_scores, r.maps


def built_at_once(tmp_path, train, test):
    with Spade.create(tmp_path / "once.h5", **SMALL, k_gallery=4) as once:
        once.add(train)
        return scores(once, test)


def test_a_reader_catches_up_with_appends_beside_it_and_the_merge_keeps_its_scores(tmp_path, data):
    train, test = data
    path = tmp_path / "c.h5"
    with Spade.create(path, **SMALL, k_gallery=4) as first:
        first.add(train[:8])
    reader = Spade.open(path, k_gallery=4)
    before = scores(reader, test)
    with Spade.open(path, "a", k_gallery=4) as writer:  # the reader has the file: appends go beside it
        assert writer.store_.beside
        writer.add(train[8:14])
        writer.add(train[12:20])  # 12, 13 again: duplicates, not added twice
    assert len(appends.segment_paths(path)) >= 2
    with FeatureStore.open(path) as base:
        assert len(base) == 8  # the corpus file itself is untouched while read
    np.testing.assert_array_equal(scores(reader, test)[0], before[0])  # nothing seen before refresh
    changes = reader.refresh()
    assert changes["added"] == 12 and len(reader.store_) == 20 and reader.paths_[8:] == \
        [os.path.abspath(p) for p in train[8:]]
    caught_up = scores(reader, test)
    with Spade.open(path, k_gallery=4) as fresh:  # opened after the appends
        np.testing.assert_array_equal(scores(fresh, test)[0], caught_up[0])
        np.testing.assert_array_equal(scores(fresh, test)[1], caught_up[1])
    want = built_at_once(tmp_path, train, test)
    np.testing.assert_array_equal(caught_up[0], want[0])
    np.testing.assert_array_equal(caught_up[1], want[1])
    reader.close()
    with Spade.open(path, "a", k_gallery=4) as writer:  # nobody reads: the segments are merged
        assert not writer.store_.beside and len(writer.store_.base) == 20
    assert not appends.appends_dir(path).exists()
    with Spade.open(path, k_gallery=4) as merged:
        assert merged.index_.ntotal == 20
        np.testing.assert_array_equal(scores(merged, test)[0], want[0])
        np.testing.assert_array_equal(scores(merged, test)[1], want[1])


def test_thresholds_calibrated_while_served_reach_the_reader(tmp_path, data):
    train, test = data
    path = tmp_path / "c.h5"
    with Spade.create(path, **SMALL, k_gallery=3) as first:
        first.add(train[:10])
    with Spade.open(path, k_gallery=3) as reader:
        assert reader.tau_ is None
        with Spade.open(path, "a", k_gallery=3) as writer:
            th = writer.calibrate(train[10:14], fpr=0.25)
        assert reader.refresh()["thresholds_changed"] and reader.tau_ == th["tau"] and reader.theta_ == th["theta"]
        assert not reader.refresh()["thresholds_changed"]
    with Spade.open(path, "a", k_gallery=3):
        pass  # merged into the corpus file
    with Spade.open(path, k_gallery=3) as fresh:
        assert fresh.tau_ == th["tau"] and fresh.store_.base.records.thresholds()["tau"] == th["tau"]


def test_one_writer_beside_a_corpus_and_a_killed_one_leaves_nothing_seen(tmp_path, data):
    train, _ = data
    path = tmp_path / "c.h5"
    with Spade.create(path, **SMALL) as first:
        first.add(train[:6])
    with Spade.open(path) as reader:
        with Spade.open(path, "a"):
            with pytest.raises(BlockingIOError, match="another process is appending"):
                Spade.open(path, "a")
        # What a writer killed mid-segment leaves: a temporary file, never read.
        half = appends.appends_dir(path) / "seg-000001.h5.tmp-999"
        half.write_bytes(b"\x89HDF half")
        assert reader.refresh()["added"] == 0
        with Spade.open(path, "a") as writer:  # the next writer removes it, and appends
            assert not half.exists()
            assert writer.add(train[6:9]).added == 3
        assert reader.refresh()["added"] == 3


def test_a_writer_killed_mid_append_beside_a_reader_loses_only_its_uncommitted_batch(tmp_path, data):
    """The kill lands at observed progress (two segments committed) with 28 more batches still
    to do, so the writer cannot have finished: no race on its speed."""
    train, test = data
    more = [s.path for s in discover(make_dataset(tmp_path / "more", n_train=60, n_good=1, n_defect=1,
                                                  size=(80, 80), seed=8), "train")]
    path = tmp_path / "c.h5"
    with Spade.create(path, **SMALL, k_gallery=3) as first:
        first.add(train[:6])
    listing = tmp_path / "new.txt"
    listing.write_text("\n".join(more) + "\n")
    total = 6 + len(more)
    with Spade.open(path, k_gallery=3) as reader:
        before = scores(reader, test)
        cmd = [sys.executable, "-m", "spade_faiss", "index", str(listing), "--out", str(path), "--batch-size", "2"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while len(appends.segment_paths(path)) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.005)
        proc.kill()
        proc.wait()
        reader.refresh()
        n = len(reader.store_)
        assert 6 < n < total and n % 2 == 0  # whole batches only
        assert len(scores(reader, test)[0]) == len(before[0])  # serves the committed corpus meanwhile
        assert subprocess.run(cmd, capture_output=True).returncode == 0  # resumes: the rest only
        assert reader.refresh()["added"] == total - n and len(reader.store_) == total
        assert len(set(reader.store_.sha256s())) == total


def test_an_empty_corpus_read_elsewhere_is_refused_before_anything_is_written(tmp_path):
    """Its first append builds the image index (and fits pca levels): that needs the file."""
    from spade_faiss.store import StoreError

    path = tmp_path / "c.h5"
    Spade.create(path, **SMALL).close()
    with FeatureStore.open(path):  # a reader
        with pytest.raises(StoreError, match="empty corpus cannot grow"):
            Spade.open(path, "a")
    assert appends.segment_paths(path) == []


def _grown_beside(path, train_base, train_more):
    """A corpus of ``train_base`` and one segment of ``train_more`` appended beside a reader."""
    with Spade.create(path, **SMALL, k_gallery=4) as first:
        first.add(train_base)
    reader = Spade.open(path, k_gallery=4)
    with Spade.open(path, "a", k_gallery=4) as writer:
        assert writer.store_.beside
        writer.add(train_more)
    reader.close()
    return appends.segment_paths(path)


def test_a_segment_of_another_corpus_is_refused_by_name_never_merged(tmp_path, data):
    """Issue 36, class 3: a foreign corpus file of the same configuration dropped into
    ``.appends/`` (its images would become normals for good), a segment of another corpus, one
    out of sequence and one written for a newer copy of the corpus file are each refused by
    readers, the merge and verify, naming the file; moving it away restores the corpus."""
    from spade_faiss.apps.verify import verify

    train, _ = data
    path = tmp_path / "c.h5"
    (seg,) = _grown_beside(path, train[:6], train[6:8])
    other = tmp_path / "other.h5"
    (foreign_seg,) = _grown_beside(other, train[:6], train[8:12])
    folder = appends.appends_dir(path)
    truncated = folder / "seg-000002.h5"  # a segment cut short (a copy that stopped): refused, quarantined
    truncated.write_bytes(open(seg, "rb").read()[:4096])
    assert "unreadable segment" in verify(str(path))[0]
    assert "quarantined" in verify(str(path), repair=True)[0] and verify(str(path)) == []
    os.remove(str(truncated) + ".quarantined")

    def corpus_of_its_own():
        with Spade.create(folder / "seg-000002.h5", **SMALL) as own:
            own.add(train[12:16])
    cases = {"a corpus file of its own": corpus_of_its_own,
             "it extends corpus": lambda: os.replace(foreign_seg, folder / "seg-000002.h5"),
             "out of sequence": lambda: os.link(seg, folder / "seg-000002.h5")}
    for why, plant in cases.items():
        plant()
        planted = str(folder / "seg-000002.h5")
        with pytest.raises(ValueError, match=f"{planted}: .*{why}.*move it out"):
            Spade.open(path)
        with pytest.raises(ValueError, match=why):
            Spade.open(path, "a")  # the merge refuses it too: nothing merged
        with FeatureStore.open(path) as base:
            assert len(base) == 6
        problems = verify(str(path))
        assert len(problems) == 1 and planted in problems[0] and why in problems[0], problems
        problems = verify(str(path), repair=True)  # quarantined: kept beside, never read
        assert len(problems) == 1 and "quarantined as seg-000002.h5.quarantined" in problems[0]
        assert verify(str(path)) == []
        with Spade.open(path, k_gallery=4) as fine:
            assert len(fine.store_) == 8
        os.remove(planted + ".quarantined")


def test_a_new_corpus_never_adopts_the_segments_of_a_deleted_one(tmp_path, data):
    """Issue 36, class 3: a corpus deleted without its ``.appends/``, then created again under
    the same name: the old segments are set aside (kept, renamed), the new corpus holds its own
    images only and works."""
    train, test = data
    path = tmp_path / "c.h5"
    _grown_beside(path, train[:6], train[6:10])
    os.remove(path)
    with Spade.create(path, **SMALL, k_gallery=4) as again:
        again.add(train[10:16])
    set_aside = [p for p in tmp_path.iterdir() if p.name.startswith("c.h5.appends.orphaned-")]
    assert len(set_aside) == 1 and any(p.name.startswith("seg-") for p in set_aside[0].iterdir())
    with Spade.open(path, k_gallery=4) as fresh:
        assert fresh.paths_ == [os.path.abspath(p) for p in train[10:16]]
        assert np.isfinite(fresh.score(test).maps).all()


def test_a_corpus_moved_without_its_segments_is_refused_and_a_copy_warned(tmp_path, data, capsys):
    """Issue 36, class 3: a corpus file moved away from the ``.appends/`` holding some of its
    images is refused by readers, writers and ``verify`` (naming the folder and the way out),
    before a writer could record the new place; moved with it, it works; a copy (the original
    still in place) says it lacks them."""
    from spade_faiss.apps import cli
    from spade_faiss.store import StoreError

    train, test = data
    path = tmp_path / "c.h5"
    _grown_beside(path, train[:6], train[6:10])
    want = scores(Spade.open(path, k_gallery=4), test)
    away = tmp_path / "moved"
    away.mkdir()
    moved = away / "c.h5"
    os.replace(path, moved)
    for mode in ("r", "a"):
        with pytest.raises(StoreError, match=r"4 image\(s\) of this corpus .*c\.h5\.appends.*: move that folder"):
            Spade.open(moved, mode, k_gallery=4)
    assert cli.main(["verify", str(moved)]) != 0
    assert "were appended beside it" in capsys.readouterr().err
    os.replace(f"{path}.appends", f"{moved}.appends")
    with Spade.open(moved, k_gallery=4) as spade:
        assert len(spade.store_) == 10
        for got, expected in zip(scores(spade, test), want):
            np.testing.assert_array_equal(got, expected)
    os.replace(f"{moved}.appends", f"{path}.appends")
    os.replace(moved, path)
    copy = away / "copy.h5"
    copy.write_bytes(path.read_bytes())
    with pytest.warns(UserWarning, match=r"a copy of .*c\.h5 without the 4 image\(s\)"):
        with Spade.open(copy, k_gallery=4) as spade:
            assert len(spade.store_) == 6


def test_a_segment_written_for_a_newer_copy_of_the_corpus_is_refused(tmp_path, data):
    """Issue 36, class 3: the corpus file restored from an older copy (fewer committed images)
    under its segments: they were written after rows it no longer has, and are refused."""
    train, _ = data
    path = tmp_path / "c.h5"
    with Spade.create(path, **SMALL, k_gallery=4) as first:
        first.add(train[:4])
    older = tmp_path / "older.h5"
    older.write_bytes(path.read_bytes())
    with Spade.open(path, "a", k_gallery=4) as more:
        more.add(train[4:8])
    reader = Spade.open(path, k_gallery=4)
    with Spade.open(path, "a", k_gallery=4) as writer:
        writer.add(train[8:10])
    reader.close()
    os.replace(older, path)
    with pytest.raises(ValueError, match="written beside 8 committed images, .* has 4: .*older copy"):
        Spade.open(path)


def test_removing_normals_equals_a_corpus_built_without_them(tmp_path, data, capsys):
    """Issue 36, class 7: `remove` by path and by sha256 rewrites the corpus without those
    images; its scores and maps are bitwise those of a corpus built from the rest at once; the
    digests and the image index follow; unknown names, a corpus being read and removing every
    image are refused, leaving the file as it was."""
    from spade_faiss.apps import cli
    from spade_faiss.apps.verify import verify

    train, test = data
    path = tmp_path / "c.h5"
    with Spade.create(path, **SMALL, k_gallery=4) as spade:
        spade.add(train[:10])
        sha_of_3 = spade.store_.sha256s()[3]
    before = path.read_bytes()
    assert cli.main(["remove", str(path), str(tmp_path / "nope.png")]) == cli.EXIT_ERROR
    assert path.read_bytes() == before
    capsys.readouterr()
    assert cli.main(["remove", str(path), train[1], sha_of_3]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["removed"] == [os.path.abspath(train[1]), os.path.abspath(train[3])] and out["images"] == 8
    rest = [p for i, p in enumerate(train[:10]) if i not in (1, 3)]
    with Spade.open(path, k_gallery=4) as after, Spade.create(tmp_path / "rest.h5", **SMALL, k_gallery=4) as want:
        want.add(rest)
        assert after.paths_ == want.paths_ and after.index_.ntotal == 8
        got, expected = after.score(test), want.score(test)
        np.testing.assert_array_equal(got.image_scores, expected.image_scores)
        np.testing.assert_array_equal(got.maps, expected.maps)
    assert verify(str(path), deep=True) == []
    with pytest.raises(ValueError, match="empty corpus"):
        with Spade.open(path, "a", k_gallery=4) as spade:
            spade.remove(rest)


def test_removing_from_a_served_corpus_excludes_at_refresh_and_the_next_lone_writer_compacts(tmp_path, data, capsys):
    """Issue 36, class 7: `remove` while a service reads the corpus records the removal beside
    it (the file untouched); the reader stops retrieving those images when it refreshes, a new
    reader at once, and both answer as a corpus built without them (scores and maps bitwise);
    the next writer with the file to itself rewrites it without them and clears the record."""
    from spade_faiss.apps import cli

    train, test = data
    path = tmp_path / "c.h5"
    with Spade.create(path, **SMALL, k_gallery=4) as spade:
        spade.add(train[:10])
        sha_of_3 = spade.store_.sha256s()[3]
    rest = [p for i, p in enumerate(train[:10]) if i not in (1, 3)]
    with Spade.create(tmp_path / "rest.h5", **SMALL, k_gallery=4) as want:
        want.add(rest)
        expected = want.score(test)
    before = path.read_bytes()
    reader = Spade.open(path, k_gallery=4)  # a service
    first = reader.score(test)
    assert {1, 3} & set(first.neighbour_ids.ravel().tolist())  # they were retrieved before
    capsys.readouterr()
    assert cli.main(["remove", str(path), train[1], sha_of_3]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pending"] and out["images"] == 8 and path.read_bytes() == before
    assert appends.read_removed(path) == {reader.store_.sha256s()[1]: os.path.abspath(train[1]),
                                          sha_of_3: os.path.abspath(train[3])}

    def same_as_rest(spade):
        got = spade.score(test)
        assert not {1, 3} & set(got.neighbour_ids.ravel().tolist())
        assert [[spade.paths_[i] for i in row] for row in got.neighbour_ids] == \
            [[want.paths_[i] for i in row] for row in expected.neighbour_ids]
        np.testing.assert_array_equal(got.image_scores, expected.image_scores)
        np.testing.assert_array_equal(got.maps, expected.maps)

    reader.refresh()
    same_as_rest(reader)
    with Spade.open(path, k_gallery=4) as fresh:  # a reader opened after the removal
        same_as_rest(fresh)
        with pytest.raises(ValueError, match="not in the corpus"):  # not removed twice
            fresh.remove([str(tmp_path / "nope.png")])
    reader.close()
    with Spade.open(path, "a", k_gallery=4) as writer:  # the next lone writer compacts
        assert writer.paths_ == want.paths_ and writer.index_.ntotal == 8 and len(writer.index_.excluded) == 0
    assert appends.read_removed(path) == {} and not appends.appends_dir(path).exists()
    with Spade.open(path, k_gallery=4) as after:
        got = after.score(test)
        np.testing.assert_array_equal(got.neighbour_ids, expected.neighbour_ids)
        np.testing.assert_array_equal(got.maps, expected.maps)
