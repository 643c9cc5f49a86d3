"""Issue 36, item 7: a corpus's generations and `rollback`. Every generation restored equals
a corpus built from that generation's images at once (scores and maps bitwise); a rollback is
a generation too; kill -9 during a rollback leaves the old state or the new one. Real files,
real processes."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from spade_faiss import Spade
from spade_faiss.apps import cli
from spade_faiss.apps.verify import verify
from spade_faiss.datasets import discover
from spade_faiss.synthetic import make_dataset

from .conftest import RUN, SMALL


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("gens") / "tile", n_train=12, n_good=2, n_defect=2, size=(80, 80),
                        seed=5)
    return [s.path for s in discover(root, "train")], [s.path for s in discover(root, "test")]


def _built(tmp_path, images, name):
    """The oracle: a corpus built from ``images`` at once, and its scores of the test images."""
    with Spade.create(tmp_path / name, **SMALL, k_gallery=3) as want:
        want.add(images)
    return want


def _same_as_built(path, images, test, tmp_path, name):
    with Spade.open(path, k_gallery=3) as got, Spade.open(_built(tmp_path, images, name).store_.path,
                                                          k_gallery=3) as want:
        assert got.paths_ == want.paths_
        a, b = got.score(test), want.score(test)
        np.testing.assert_array_equal(a.image_scores, b.image_scores)
        np.testing.assert_array_equal(a.maps, b.maps)
    assert verify(str(path), deep=True) == []


def _generations(path, capsys):
    capsys.readouterr()
    assert cli.main(["info", str(path)]) == 0
    return json.loads(capsys.readouterr().out)["generations"]


def test_every_generation_rolls_back_to_what_it_held(tmp_path, data, capsys):
    train, test = data
    path = tmp_path / "c.h5"
    with Spade.create(path, **SMALL, k_gallery=3) as spade:  # generation 1: an index run
        spade.add(train[:5])
    with Spade.open(path, "a", k_gallery=3) as spade:  # 2: another run appends
        spade.add(train[5:8])
    with Spade.open(path, "a", k_gallery=3) as spade:  # 3: a removal (a rewrite)
        spade.remove([train[1]])
    with Spade.open(path, "a", k_gallery=3) as spade:  # 4: appends after it
        spade.add(train[8:10])
    gens = _generations(path, capsys)
    assert [(g["generation"], g["images"], g["change"]) for g in gens] == \
        [(1, 5, "append"), (2, 8, "append"), (3, 7, "remove 1"), (4, 9, "append")]
    assert gens[2]["before"] == "gen-000002.h5" and os.path.isfile(f"{path}.generations/gen-000002.h5")
    states = {1: train[:5], 2: train[:8], 3: [p for p in train[:8] if p != train[1]],
              4: [p for p in train[:10] if p != train[1]]}
    for step, g in enumerate([2, 1, 4, 3, 6]):  # 6: the rollback to 1, rolled back to
        capsys.readouterr()
        assert cli.main(["rollback", str(path), "--generation", str(g)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["generation"] == 5 + step and out["restored"] == g
        want = states[5 + step] = states[g]
        _same_as_built(path, want, test, tmp_path, f"want{step}.h5")
    gens = _generations(path, capsys)
    assert [g["change"] for g in gens[4:]] == ["rollback to 2", "rollback to 1", "rollback to 4", "rollback to 3",
                                               "rollback to 6"]


def test_a_rollback_is_refused_clearly(tmp_path, data, capsys):
    train, _ = data
    path = tmp_path / "c.h5"
    with Spade.create(path, **SMALL, k_gallery=3) as spade:
        spade.add(train[:4])
    before = path.read_bytes()
    capsys.readouterr()
    assert cli.main(["rollback", str(path), "--generation", "7"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "no generation 7 (recorded: 1..1" in err and "Traceback" not in err and path.read_bytes() == before
    with Spade.open(path, k_gallery=3) as reader, pytest.raises(ValueError, match="needs it to itself"):
        reader.rollback(1)
    with Spade.open(path, "a", k_gallery=3) as spade:  # a removal keeps generation 1 in a snapshot
        spade.remove([train[0]])
    os.remove(f"{path}.generations/gen-000001.h5")
    assert cli.main(["rollback", str(path), "--generation", "1"]) == cli.EXIT_ERROR
    assert "gen-000001.h5, which is missing" in capsys.readouterr().err


def test_a_corpus_of_an_older_version_records_its_state_as_found(tmp_path, data, capsys):
    train, test = data
    path = tmp_path / "c.h5"
    with Spade.create(path, **SMALL, k_gallery=3) as spade:
        spade.add(train[:4])
    with h5py.File(path, "r+") as h:  # as written before 0.3.2: no record
        del h.attrs["generations"]
    assert [(g["generation"], g["change"]) for g in _generations(path, capsys)] == [(1, "as found")]
    with Spade.open(path, "a", k_gallery=3) as spade:
        spade.add(train[4:6])
    assert [(g["generation"], g["images"], g["change"]) for g in _generations(path, capsys)] == \
        [(1, 6, "as found")]  # its first record: the state the first writer left
    with Spade.open(path, "a", k_gallery=3) as spade:
        spade.remove([train[5]])
    assert cli.main(["rollback", str(path), "--generation", "1"]) == 0
    _same_as_built(path, train[:6], test, tmp_path, "want.h5")


def test_kill_9_during_a_rollback_leaves_one_state_or_the_other(tmp_path, data):
    """SIGKILL at seeded points of progress (the temporary file's growth) during rollbacks of a
    removal: afterwards the corpus is exactly the state before or the one restored, verify is
    clean, and no temporary is left behind the next writer."""
    train, _ = data
    path = tmp_path / "c.h5"
    with Spade.create(path, **SMALL, k_gallery=3) as spade:
        spade.add(train)
    with Spade.open(path, "a", k_gallery=3) as spade:
        spade.remove([train[2]])
    removed_state = [p for p in train if p != train[2]]
    full_size = path.stat().st_size
    seen = set()
    rng = np.random.default_rng(0)
    for fraction in rng.uniform(0.1, 0.9, 4):
        cmd = [sys.executable, "-m", "spade_faiss", "rollback", str(path), "--generation", "1"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tmp = [f"{path}.tmp-{proc.pid}"]
        while proc.poll() is None and not (os.path.exists(tmp[0]) and os.path.getsize(tmp[0]) >= fraction * full_size):
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with Spade.open(path, k_gallery=3) as spade:
            state = spade.paths_
        assert state in ([os.path.abspath(p) for p in removed_state], [os.path.abspath(p) for p in train])
        seen.add(len(state))
        if len(state) == len(train):  # the rollback landed before the kill: go back for the next try
            assert cli.main(["rollback", str(path), "--generation", "2"]) == 0
        problems = verify(str(path))
        assert all("image index" in p or "did not close it" in p for p in problems), problems
    with Spade.open(path, "a", k_gallery=3) as spade:
        spade.reindex()
    assert verify(str(path), deep=True) == []
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert len(seen - {len(train)}) == 1  # at least one kill landed before the rename


def test_a_run_records_its_generation_and_refuses_to_resume_against_another(tmp_path, data, capsys):
    """Same number of images, another generation (one removed, one added): the resumed run is
    refused by name instead of mixing scores of two corpora."""
    train, test = data
    path, run = tmp_path / "c.h5", tmp_path / "run"
    with Spade.create(path, **SMALL, k_gallery=3) as spade:
        spade.add(train[:4])
    src = tmp_path / "test.txt"
    src.write_text("\n".join(test[:1]) + "\n")
    assert cli.main(["score", str(path), str(src), "--out", str(run), "--maps", "none", *RUN]) == 0
    assert json.loads((run / "run.json").read_text())["corpus_generation"] == [1, 0]
    with Spade.open(path, "a", k_gallery=3) as spade:
        spade.remove([train[0]])
        spade.add([train[4]])
    capsys.readouterr()
    assert cli.main(["score", str(path), str(src), "--out", str(run), "--maps", "none", *RUN]) == cli.EXIT_ERROR
    assert "corpus_generation: [1, 0] -> [3, 0]" in capsys.readouterr().err
