"""The hostile suite (issue 36): one test per class of failure a hostile campaign found, each
through real processes (the ``spade-faiss`` command, a real server on loopback) on real files.
The unit-level tests of each class live beside their modules; these say, end to end, that the
class is closed:

1. options and limits checked before any work       5. a served corpus never dies
2. image shapes bounded on every path               6. a resumed run trusts content, not paths
3. a corpus knows its own segments                  7. normals removed from a served corpus
4. checksums that catch any damage
"""

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from spade_faiss import Spade
from spade_faiss.apps.runs import read_rows
from spade_faiss.datasets import discover
from spade_faiss.store import appends
from spade_faiss.synthetic import texture, write_png

from .conftest import FEAT, RUN, SMALL

SPADE = [sys.executable, "-m", "spade_faiss"]


def spade(*argv, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*SPADE, *map(str, argv)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, dataset):
    root = tmp_path_factory.mktemp("hostile")
    path = root / "c.h5"
    assert spade("index", dataset, "--out", path, *FEAT).returncode == 0
    return path


@pytest.fixture
def copy(corpus, tmp_path):
    """A private copy of the shared corpus (tests that damage or grow it)."""
    path = tmp_path / "c.h5"
    shutil.copy(corpus, path)
    return path


def test_1_every_out_of_range_option_is_one_line_before_any_model_loads(corpus, tmp_path):
    # one per command family (tests/test_options.py tries every option of every command in-process)
    cases = [("serve", corpus, "--max-batch", "0"),
             ("score", corpus, tmp_path, "--out", tmp_path / "r", "--tau", "nan"),
             ("watch", "0", corpus, "--out", tmp_path / "w", "--buffer", "0"),
             ("index", tmp_path, "--out", tmp_path / "x.h5", "--tile", "64", "--tile-overlap", "64")]
    for argv in cases:
        t = time.monotonic()
        done = spade(*argv, *RUN)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("spade-faiss: error:"), (argv, lines)
        assert time.monotonic() - t < 30  # refused at the start: no model was built
    assert not (tmp_path / "r").exists() and not (tmp_path / "x.h5").exists()


def test_2_extreme_shapes_score_with_overlays_in_a_real_process(corpus, tmp_path):
    rng = np.random.default_rng(0)
    for name, shape in (("thin.png", (2, 20000)), ("tall.png", (12000, 3)), ("dot.png", (1, 1))):
        write_png(tmp_path / "in" / name, texture(rng, shape))
    done = spade("score", corpus, tmp_path / "in", "--out", tmp_path / "run", *RUN, "--k-gallery", 4)
    assert done.returncode == 0, done.stderr
    rows = read_rows(tmp_path / "run" / "scores.csv")
    assert len(rows) == 3 and all(r["overlay"] and (tmp_path / "run" / r["overlay"]).is_file() for r in rows)


def test_3_a_foreign_file_among_the_segments_is_refused_by_name_and_quarantined(copy, tmp_path, dataset):
    train = [s.path for s in discover(dataset)]
    with Spade.create(tmp_path / "other.h5", **SMALL) as other:  # same configuration, another corpus
        other.add(train[:3])
    folder = appends.appends_dir(copy)
    folder.mkdir()
    planted = folder / "seg-000001.h5"
    shutil.copy(tmp_path / "other.h5", planted)
    done = spade("score", copy, dataset, "--out", tmp_path / "run", *RUN)
    assert done.returncode == 1 and str(planted) in done.stderr
    done = spade("verify", copy)
    assert done.returncode == 1 and str(planted) in done.stdout + done.stderr
    done = spade("verify", copy, "--repair")  # reports the problem (exit 1) and quarantines the file
    assert done.returncode == 1 and "quarantined" in done.stdout + done.stderr
    assert spade("verify", copy).returncode == 0 and (folder / "seg-000001.h5.quarantined").is_file()


def test_4_damage_the_checksums_cannot_see_fails_the_query_naming_the_image(copy, tmp_path, dataset):
    from .test_representations import _fletcher_blind_damage

    plain = tmp_path / "f16.h5"  # float16: fletcher32 cannot see this damage, the digest does
    assert spade("convert", copy, "--out", plain, "--storage", "float16").returncode == 0
    _fletcher_blind_damage(plain, "levels/layer1", 2)
    done = spade("verify", plain, "--deep")
    assert done.returncode == 1 and "layer1 of image 2" in done.stdout + done.stderr
    train = [s.path for s in discover(dataset)]
    done = spade("score", plain, train[2], "--out", tmp_path / "run", *RUN, "--k-gallery", 3)
    assert done.returncode == 3 and "layer1 of image 2" in done.stderr  # skipped by name: no NaN, no crash
    assert "does not match its digest" in (tmp_path / "run" / "errors.csv").read_text()


def test_5_a_mistyped_thresholds_record_degrades_health_and_the_service_answers(copy, tmp_path, dataset):
    from .test_serve import Server, request, wait_for

    server = Server(copy, tmp_path, "--refresh-s", "0.1")
    try:
        folder = appends.appends_dir(copy)
        folder.mkdir(exist_ok=True)
        (folder / "thresholds.json").write_text('{"tau": "high", "theta": 1.0}')
        wait_for(lambda: json.loads(request(server.url + "/v1/health", token=None)[1])["status"] == "degraded")
        health = json.loads(request(server.url + "/v1/health", token=None)[1])
        assert "thresholds.json" in json.dumps(health)
        image = open([s.path for s in discover(dataset, "test")][0], "rb").read()
        status, body, _ = request(server.url + "/v1/score", data=image)
        assert status == 200 and "score" in json.loads(body)  # the last good state keeps answering
    finally:
        assert server.stop() == 0


def test_6_a_resumed_run_scores_again_an_input_whose_content_changed(corpus, tmp_path):
    rng = np.random.default_rng(1)
    for k in range(3):
        write_png(tmp_path / "in" / f"{k}.png", texture(rng, (80, 80)))
    assert spade("score", corpus, tmp_path / "in", "--out", tmp_path / "run", *RUN, "--k-gallery", 4).returncode == 0
    first = {r["image_path"]: r for r in read_rows(tmp_path / "run" / "scores.csv")}
    write_png(tmp_path / "in" / "1.png", texture(rng, (80, 80)))  # same path, new content
    done = spade("score", corpus, tmp_path / "in", "--out", tmp_path / "run", *RUN, "--k-gallery", 4)
    assert done.returncode == 0 and json.loads(done.stdout.strip().splitlines()[-1])["scored"] == 1
    rows = read_rows(tmp_path / "run" / "scores.csv")
    changed = str(tmp_path / "in" / "1.png")
    assert [r["image_path"] for r in rows].count(changed) == 2 and rows[-1]["image_path"] == changed
    assert rows[-1]["sha256"] != first[changed]["sha256"]


def test_7_a_normal_removed_from_a_served_corpus_is_never_retrieved_after_a_refresh(copy, tmp_path, dataset):
    from .test_serve import Server, request, wait_for

    image = open([s.path for s in discover(dataset, "test")][0], "rb").read()
    server = Server(copy, tmp_path, "--refresh-s", "0.1")
    try:
        neighbours = json.loads(request(server.url + "/v1/score", data=image)[1])["neighbours"]
        done = spade("remove", copy, neighbours[0])
        assert done.returncode == 0 and json.loads(done.stdout)["pending"], done.stderr
        def answered_without_it():
            return neighbours[0] not in json.loads(request(server.url + "/v1/score", data=image)[1])["neighbours"]

        wait_for(answered_without_it)
        assert json.loads(request(server.url + "/v1/health", token=None)[1])["status"] == "ok"
    finally:
        assert server.stop() == 0
    done = spade("reindex", copy)  # the next command with the corpus to itself compacts it
    assert done.returncode == 0, done.stderr
    assert not appends.read_removed(copy) and not appends.appends_dir(copy).exists()
    with Spade.open(copy) as after:
        assert neighbours[0] not in after.paths_ and after.index_.ntotal == len(after.paths_)
