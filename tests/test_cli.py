"""The CLI on real files: index (dedupe, append, bad input), info, reindex, score (resume, shards)."""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from spade_faiss.apps import cli
from spade_faiss.apps.runs import RunDir, read_rows
from spade_faiss.store import FeatureStore

from .conftest import FEAT, RUN


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def corpus(tmp_path, dataset, capsys):
    out = tmp_path / "c.h5"
    code, stdout, _ = run(capsys, "index", dataset, "--out", out, *FEAT)
    assert code == 0 and json.loads(stdout)["added"] == 12
    return out


def test_reindexing_adds_nothing_and_new_files_add_exactly_those(tmp_path, dataset, corpus, capsys):
    code, out, _ = run(capsys, "index", dataset, "--out", corpus, *FEAT)
    assert code == 0 and json.loads(out)["added"] == 0 and json.loads(out)["duplicates"] == 12
    more = tmp_path / "more"
    shutil.copytree(dataset / "train", more)
    for i, src in enumerate(sorted((dataset / "test" / "defect").glob("*.png"))[:3]):
        shutil.copy(src, more / "good" / f"new{i}.png")
    code, out, _ = run(capsys, "index", more, "--out", corpus, *FEAT)
    assert code == 0 and json.loads(out)["added"] == 3 and json.loads(out)["images"] == 15
    code, out, _ = run(capsys, "info", corpus)
    info = json.loads(out)
    assert info["images"] == 15 and info["index"]["ntotal"] == 15 and info["index"]["factory"] == "Flat"


def test_partly_unreadable_folder_indexes_the_rest_and_lists_the_bad(tmp_path, dataset, capsys):
    src = tmp_path / "src"
    shutil.copytree(dataset / "train" / "good", src)
    (src / "text.png").write_text("hello")
    data = (src / "000.png").read_bytes()
    (src / "trunc.png").write_bytes(data[: len(data) // 3])
    import cv2
    jpg = bytearray(cv2.imencode(".jpg", cv2.imread(str(src / "000.png")))[1].tobytes())
    scan = jpg.find(b"\xff\xda") + 200
    for k in range(20):
        jpg[scan + 37 * k] ^= 0x5A  # damaged scan data: libjpeg decodes it with a warning only
    (src / "damaged.jpg").write_bytes(bytes(jpg))
    code, out, err = run(capsys, "index", src, "--out", tmp_path / "c.h5", *FEAT)
    assert code == cli.EXIT_PARTIAL
    assert json.loads(out)["added"] == 12 and json.loads(out)["errors"] == 3
    assert "text.png: not a decodable image" in err and "trunc.png: truncated PNG" in err
    assert "damaged.jpg: damaged JPEG data (Corrupt JPEG data" in err


@pytest.mark.parametrize("case", ["missing", "empty", "only_bad", "backbone", "weights", "config"])
def test_bad_input_gives_one_line_error_and_nonzero_exit(tmp_path, dataset, corpus, capsys, case):
    args = {"missing": ["index", tmp_path / "nope", "--out", tmp_path / "x.h5", *FEAT],
            "empty": ["index", tmp_path / "empty", "--out", tmp_path / "x.h5", *FEAT],
            "only_bad": ["index", tmp_path / "bad", "--out", tmp_path / "x.h5", *FEAT],
            "backbone": ["index", dataset, "--out", tmp_path / "x.h5", *FEAT, "--backbone", "vgg16"],
            "weights": ["index", dataset, "--out", tmp_path / "x.h5", *FEAT, "--weights", tmp_path / "w.pth"],
            "config": ["index", dataset, "--out", corpus, *FEAT, "--crop", "48"]}[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_text("not an image")
    (tmp_path / "w.pth").write_bytes(b"junk")
    code, _, err = run(capsys, *args)
    assert code == cli.EXIT_ERROR
    errors = [ln for ln in err.splitlines() if ln.startswith("spade-faiss: error:")]
    expected = {"missing": "nope", "empty": "no images found", "only_bad": "no image of",
                "backbone": "vgg16", "weights": "w.pth", "config": "crop: store has 64, requested 48"}[case]
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "x.h5").exists()  # a failed first run leaves no empty corpus behind


def test_score_writes_outputs_and_resumes(tmp_path, dataset, corpus, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "score", corpus, dataset, "--out", out, *RUN, "--k-gallery", "5")
    assert code == 0 and json.loads(stdout)["scored"] == 7
    rows = read_rows(out / "scores.csv")
    assert [r["image_path"] for r in rows] == sorted(r["image_path"] for r in rows)
    assert len(rows[0]["neighbour_paths"].split(";")) == 5
    with h5py.File(out / "maps.h5") as h:
        assert h["maps"].shape == (7, 64, 64)
        assert [p.decode() for p in h["path"][:]] == [r["image_path"] for r in rows]
        first = h["maps"][:]
    assert sorted(p.relative_to(out / "overlays").as_posix() for p in (out / "overlays").rglob("*.png")) == \
        [f"defect/{i:03d}.png" for i in range(4)] + [f"good/{i:03d}.png" for i in range(3)]
    assert [r["overlay"] for r in rows] == [f"overlays/{r['folder']}/{r['image_path'][-7:]}" for r in rows]
    # An interrupted run: keep the first 3 rows, as a crash after 3 images would.
    (tmp_path / "cut").mkdir()
    lines = (out / "scores.csv").read_text().splitlines(keepends=True)
    (tmp_path / "cut" / "scores.csv").write_text("".join(lines[:4]))
    shutil.copy(out / "maps.h5", tmp_path / "cut" / "maps.h5")
    shutil.copy(out / "run.json", tmp_path / "cut" / "run.json")
    code, stdout, _ = run(capsys, "score", corpus, dataset, "--out", tmp_path / "cut", *RUN, "--k-gallery", "5",
                          "--no-overlays")
    assert json.loads(stdout) == {"run": str(tmp_path / "cut"), "scored": 4, "skipped_done": 3, "errors": 0}
    resumed = read_rows(tmp_path / "cut" / "scores.csv")
    assert resumed[:3] == rows[:3] and [dict(r, overlay="") for r in rows[3:]] == resumed[3:]  # --no-overlays
    with h5py.File(tmp_path / "cut" / "maps.h5") as h:
        np.testing.assert_array_equal(h["maps"][:], first)  # resumed images score bitwise the same


def test_shards_union_equals_one_run(tmp_path, dataset, corpus, capsys):
    run(capsys, "score", corpus, dataset, "--out", tmp_path / "one", *RUN, "--no-overlays")
    for i in range(3):
        code, _, _ = run(capsys, "score", corpus, dataset, "--out", tmp_path / "sharded", *RUN, "--no-overlays",
                         "--shard-index", i, "--num-shards", 3)
        assert code == 0
    assert RunDir(tmp_path / "sharded").score_rows() == RunDir(tmp_path / "one").score_rows()
    assert len(list((tmp_path / "sharded").glob("scores.shard-*-of-00003.csv"))) == 3


def test_score_lists_failures_in_errors_csv(tmp_path, dataset, corpus, capsys):
    src = tmp_path / "q"
    shutil.copytree(dataset / "test" / "good", src)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, out, err = run(capsys, "score", corpus, src, "--out", tmp_path / "run", *RUN)
    assert code == cli.EXIT_PARTIAL and json.loads(out)["scored"] == 3
    errs = read_rows(tmp_path / "run" / "errors.csv")
    assert [e["image_path"] for e in errs] == [str(src / "broken.png")] and "truncated PNG" in errs[0]["reason"]


def test_reindex_to_ivf_and_corrupt_store(tmp_path, corpus, capsys):
    code, out, _ = run(capsys, "reindex", corpus, "--index", "ivf", "--nlist", "2")
    assert code == 0 and json.loads(out)["factory"] == "IVF2,Flat"
    bad = tmp_path / "bad.h5"
    bad.write_bytes(corpus.read_bytes()[:5000])
    code, _, err = run(capsys, "info", bad)
    assert code == cli.EXIT_ERROR and "bad.h5" in err and "Traceback" not in err


@pytest.mark.parametrize("extra, module, argv", [
    ("ray", "ray", ["index", "{data}", "--out", "{tmp}/r.h5", *FEAT, "--backend", "ray"]),
    ("serve", "fastapi", ["serve", "{corpus}", *RUN]),
])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, dataset, corpus, capsys, monkeypatch, extra, module, argv):
    monkeypatch.setitem(sys.modules, module, None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "spade_faiss.apps.serve", raising=False)
    args = [a.format(data=dataset, tmp=tmp_path, corpus=corpus) for a in argv]
    code, _, err = run(capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.startswith("spade-faiss: error:")]
    assert code == cli.EXIT_ERROR and len(lines) == 1 and f"'{extra}' extra" in lines[0], err
    assert "Traceback" not in err


def test_correspondences_in_the_run_and_explain(tmp_path, dataset, corpus, capsys):
    from spade_faiss.detector import Spade
    out = tmp_path / "run"
    code, _, _ = run(capsys, "score", corpus, dataset, "--out", out, *RUN, "--k-gallery", "4", "--correspondences")
    assert code == 0
    rows = read_rows(out / "scores.csv")
    with Spade.open(corpus, k_gallery=4, k_image=4) as spade:
        want = list(spade.iter_score([r["image_path"] for r in rows], correspondences=True))
    with h5py.File(out / "maps.h5") as h:
        assert sorted(h["correspondences"]) == ["layer1", "layer2", "layer3"]
        for lv in ("layer1", "layer2", "layer3"):
            got = h["correspondences"][lv][:]
            assert got.dtype == np.int32 and got.shape[-1] == 3
            np.testing.assert_array_equal(got, np.stack([r.correspondences[lv] for r in want]))
            np.testing.assert_array_equal(h["level_scores"][lv][:], np.stack([r.level_scores[lv] for r in want]))
    sheets = sorted((out / "explain").rglob("*.png"))
    assert len(sheets) == 5 and {p.parent.name for p in sheets} <= {"good", "defect"}
    assert "Why: nearest normal patches" in (out / "report.html").read_text()
    image = rows[0]["image_path"]
    code, stdout, _ = run(capsys, "explain", corpus, image, "--out", tmp_path / "why.png", *RUN, "--k-gallery", "4")
    answer = json.loads(stdout)
    assert code == 0 and (tmp_path / "why.png").stat().st_size > 5000
    assert set(answer["points"]) == {"most anomalous", "most normal"}
    assert all(v["image"].startswith(str(dataset)) for v in answer["points"]["most normal"]["nearest"].values())


def test_a_corpus_built_from_relative_paths_works_from_any_folder(tmp_path, dataset, monkeypatch, capsys):

    shutil.copytree(dataset / "train" / "good", tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["index", "imgs", "--out", "c.h5", *FEAT]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with FeatureStore.open(tmp_path / "c.h5") as s:
        assert all(os.path.isabs(p) and os.path.isfile(p) for p in s.paths())
    assert cli.main(["verify", str(tmp_path / "c.h5"), "--rehash"]) == 0
    capsys.readouterr()


def test_the_report_summarises_the_whole_run_after_a_resume_in_plain_words(tmp_path, dataset, capsys):
    store, run = tmp_path / "c.h5", tmp_path / "run"
    assert cli.main(["index", str(dataset), "--out", str(store), *FEAT]) == 0
    for _ in range(2):  # the second invocation resumes: nothing left to score
        assert cli.main(["score", str(store), str(dataset), "--out", str(run), *RUN, "--k-gallery", "3",
                         "--no-overlays"]) == 0
    capsys.readouterr()
    page = (run / "report.html").read_text()
    assert "<title>spade-faiss: run</title>" in page
    assert "<th>images</th><td>7</td>" in page and "<th>invocations</th><td>2</td>" in page
    assert "skipped_done" not in page and '{"k_image"' not in page and "k_gallery: 3" in page


def test_convert_and_info_show_the_bytes_per_image(tmp_path, dataset, capsys):
    store, small = tmp_path / "c.h5", tmp_path / "small.h5"
    assert cli.main(["index", str(dataset), "--out", str(store), *FEAT]) == 0
    capsys.readouterr()
    assert cli.main(["convert", str(store), "--out", str(small), "--storage", "compact"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["storage"] == "layer1=pca64,layer2=pca96,layer3=pca128" and out["images"] == 12
    assert cli.main(["info", str(small)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes_per_image"] == out["bytes_per_image"] and info["format_version"] == 2
    assert info["bytes_per_image"]["layer1"] == 16 * 16 * 65  # int8 codes: a byte per direction, one exponent
    assert cli.main(["convert", str(store), "--out", str(small)]) == cli.EXIT_ERROR  # exists: refused


def test_the_old_engine_spelling_is_a_deprecated_alias_of_backend(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["score", "c.h5", "d", "--out", "o"]).backend == "local"
    assert parser.parse_args(["score", "c.h5", "d", "--out", "o", "--backend", "ray"]).backend == "ray"
    capsys.readouterr()
    assert parser.parse_args(["score", "c.h5", "d", "--out", "o", "--engine", "ray"]).backend == "ray"
    assert "--engine is deprecated: use --backend" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["score", "c.h5", "d", "--out", "o", "--backend", "spark"])


@pytest.mark.parametrize("option, value, word", [
    ("--max-batch", "0", "max_batch=0"), ("--queue-size", "0", "queue_size=0"), ("--timeout", "-1", "timeout_s=-1"),
    ("--max-upload-mb", "-1", "max_upload_mb=-1"), ("--port", "80000", "port=80000"),
    ("--max-pixels", "0", "max_pixels=0"), ("--refresh-s", "-1", "refresh_s=-1"),
    ("--batch-window-ms", "-5", "batch_window_ms=-5"),
])
def test_serve_refuses_a_limit_out_of_range_before_any_model_loads(tmp_path, capsys, option, value, word):
    pytest.importorskip("fastapi")
    missing = tmp_path / "no-such-corpus.h5"  # the limits are checked before the corpus is opened
    assert cli.main(["serve", str(missing), option, value]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0] and "expected" in err[0], err


def test_sigint_during_score_exits_130_at_a_committed_row_and_the_run_resumes(tmp_path, dataset):
    """Ctrl-C stops `score` every time (several tries, each signalled once rows are committed):
    exit 130, an "interrupted" line, the committed rows kept once each, and the same command
    finishes the rest."""
    import signal
    import subprocess
    import time

    store = tmp_path / "c.h5"
    assert cli.main(["index", str(dataset / "train"), "--out", str(store), *FEAT]) == 0
    from spade_faiss.synthetic import make_dataset

    images = make_dataset(tmp_path / "many", n_train=1, n_good=15, n_defect=15, size=(64, 64), seed=3) / "test"
    for attempt, at_rows in enumerate((1, 3, 6)):
        out = tmp_path / f"run{attempt}"
        cmd = [sys.executable, "-m", "spade_faiss", "score", str(store), str(images), "--out", str(out), *RUN,
               "--batch-size", "1", "--no-report"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while len(read_rows(out / "scores.csv")) < at_rows:  # progress, not time
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert "interrupted" in err
        rows = [r["image_path"] for r in read_rows(out / "scores.csv")]
        assert at_rows <= len(rows) < 30 and len(set(rows)) == len(rows), len(rows)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        rows = [r["image_path"] for r in read_rows(out / "scores.csv")]
        assert sorted(rows) == sorted(str(p) for p in images.rglob("*.png")) and len(rows) == 30


def test_index_hold_out_sets_aside_a_seeded_sample_disjoint_from_the_corpus_and_calibrates_on_it(tmp_path, capsys):
    from spade_faiss.detector import describe, held_out_list
    from spade_faiss.synthetic import make_dataset

    root = make_dataset(tmp_path / "data", n_train=30, n_good=1, n_defect=1, size=(64, 64), seed=4)
    every = sorted(str(p) for p in (root / "train" / "good").iterdir())
    chosen = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "7")):
        out = tmp_path / f"{name}.h5"
        assert cli.main(["index", str(root), "--out", str(out), *FEAT, "--hold-out", "0.3", "--seed", seed]) in (0, 3)
        record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        held = Path(held_out_list(out)).read_text().split()
        with FeatureStore.open(out) as store:
            indexed = store.paths()
        assert held and not set(held) & set(indexed) and sorted(held + indexed) == every  # disjoint, complete
        assert record["n_images"] == len(held) and record["tau"] == describe(out)["thresholds"]["tau"]
        chosen[name] = held
    assert chosen["a"] == chosen["b"] != chosen["c"]  # seeded
    assert cli.main(["index", str(root), "--out", str(tmp_path / "d.h5"), *FEAT, "--hold-out", "1.5"]) == 1


def test_serve_refuses_a_busy_port_before_any_model_loads(tmp_path, capsys):
    import socket

    pytest.importorskip("fastapi")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert cli.main(["serve", str(tmp_path / "no-such-corpus.h5"), "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0], err


def test_score_lists_defect_regions_of_the_maps_at_theta(tmp_path, dataset, corpus, capsys):
    """Issue 38: with a pixel threshold, each image's regions (connected components of its map at
    the image's resolution above theta) are rows of regions.csv, counted in scores.csv and boxed
    on the overlays; they equal find_regions on the stored map; a resumed run lists them once."""
    from spade_faiss.images import load_image
    from spade_faiss.regions import find_regions
    from spade_faiss.scoring import map_to_original

    out = tmp_path / "run"
    code, _, _ = run(capsys, "score", corpus, dataset, "--out", out, *RUN, "--k-gallery", "5")
    with h5py.File(out / "maps.h5") as h:
        maps = h["maps"][:]
    theta = float(np.quantile(maps, 0.97))
    out = tmp_path / "regions"
    code, _, _ = run(capsys, "score", corpus, dataset, "--out", out, *RUN, "--k-gallery", "5", "--theta", theta)
    assert code == 0
    rows, regions = read_rows(out / "scores.csv"), read_rows(out / "regions.csv")
    resize = 72  # FEAT
    with h5py.File(out / "maps.h5") as h:
        for i, row in enumerate(rows):
            size = load_image(row["image_path"]).size
            want = find_regions(map_to_original(h["maps"][i], size, resize), theta)
            got = [r for r in regions if r["image_path"] == row["image_path"]]
            assert [int(r["region"]) for r in got] == list(range(len(want)))
            assert [(int(r["x0"]), int(r["y0"]), int(r["x1"]), int(r["y1"]), int(r["area"])) for r in got] == \
                [(g.x0, g.y0, g.x1, g.y1, g.area) for g in want]
            assert int(row["regions"]) == len(want) and int(row["largest_region"]) == max((g.area for g in want),
                                                                                          default=0)
    assert sum(int(r["regions"]) for r in rows) == len(regions) > 0
    report = (out / "report.html").read_text()  # the report's table says them too
    assert sorted(int(n) for n in re.findall(r"data-regions='(\d+)'", report)) == \
        sorted(int(r["regions"]) for r in rows)
    # A crash after the regions of the last image, before its score row: resumed, listed once.
    lines = (out / "scores.csv").read_text().splitlines(keepends=True)
    (out / "scores.csv").write_text("".join(lines[:-1]))
    code, _, _ = run(capsys, "score", corpus, dataset, "--out", out, *RUN, "--k-gallery", "5", "--theta", theta)
    assert code == 0 and read_rows(out / "regions.csv") == regions and read_rows(out / "scores.csv") == rows


def test_a_resumed_run_scores_again_an_input_whose_content_changed(tmp_path, dataset, corpus, capsys):
    """Issue 36, class 6: resume is by content: an input replaced since it was scored is scored
    again (its new row and map count, its old ones are superseded), the others are not; a run
    with nothing changed scores nothing."""
    from spade_faiss.detector import Spade
    from spade_faiss.images import sha256_bytes

    src = tmp_path / "src"
    src.mkdir()
    goods = sorted((dataset / "test" / "good").glob("*.png"))
    defect = sorted((dataset / "test" / "defect").glob("*.png"))[0]
    for p in goods:
        shutil.copy(p, src / p.name)
    out = tmp_path / "run"
    args = ["score", corpus, src, "--out", out, *RUN, "--k-gallery", "5", "--no-report"]
    code, stdout, _ = run(capsys, *args)
    assert code == 0 and json.loads(stdout)["scored"] == 3
    before = {r["image_path"]: r for r in RunDir(out).score_rows()}
    changed = src / goods[1].name
    shutil.copy(defect, changed)  # the same name, other content
    code, stdout, _ = run(capsys, *args)
    assert json.loads(stdout) == {"run": str(out), "scored": 1, "skipped_done": 2, "errors": 0}
    rows = {r["image_path"]: r for r in RunDir(out).score_rows()}
    assert len(rows) == 3 and rows[str(changed)]["sha256"] == sha256_bytes(changed.read_bytes())
    assert all(rows[p] == before[p] for p in rows if p != str(changed))
    with Spade.open(corpus, k_gallery=5) as spade:
        want = spade.score([str(changed)])
    assert float(rows[str(changed)]["score"]) == pytest.approx(float(want.image_scores[0]), rel=1e-5)
    assert float(rows[str(changed)]["score"]) != pytest.approx(float(before[str(changed)]["score"]), rel=1e-3)
    with h5py.File(out / "maps.h5") as h:
        paths = [p.decode() for p in h["path"][:]]
        last = len(paths) - 1 - paths[::-1].index(str(changed))
        np.testing.assert_array_equal(h["maps"][last], want.maps[0])
    code, stdout, _ = run(capsys, *args)
    assert json.loads(stdout)["scored"] == 0 and json.loads(stdout)["skipped_done"] == 3


def test_every_command_prints_its_help():
    """``spade-faiss COMMAND --help`` for every command: argparse formats help texts with ``%``
    (a table help saying "top 1% of" once made ``score --help`` a traceback)."""
    import argparse

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"index", "score", "serve", "watch"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        assert text.startswith("usage:"), name
    assert "top 1% of" in commands["score"].format_help()
    assert "--same-position" in commands["score"].format_help()
