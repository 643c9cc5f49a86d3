"""``spade-faiss watch`` (issue 37): a live source scored as it comes, in real processes: a video
file played at its frame rate as a camera, a growing folder; gating (stage 2 only above tau),
drops when scoring falls behind, Prometheus metrics, SIGTERM stopping it cleanly."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import h5py
import numpy as np
import pytest

from spade_faiss import video
from spade_faiss.apps import cli
from spade_faiss.apps.runs import read_rows
from spade_faiss.synthetic import write_png

from .conftest import FEAT, RUN
from .test_serve import free_port
from .test_video import scene, write_video

SPADE = [sys.executable, "-m", "spade_faiss"]


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """A corpus of normal videos' frames, a test video whose frames 9.. hold a defect, and the
    `score` command's run over every frame of it (the reference)."""
    root = tmp_path_factory.mktemp("line")
    normals = root / "normals"
    normals.mkdir()
    for k in range(3):
        write_video(normals / f"n{k}.avi", scene(10 + k, 12))
    test = write_video(root / "test.avi", scene(20, 18, defect_from=9))
    corpus = root / "c.h5"
    assert cli.main([str(a) for a in ("index", normals, "--out", corpus, *FEAT, "--frame-stride", 2)]) == 0
    assert cli.main([str(a) for a in ("score", corpus, test, "--out", root / "ref", *RUN, "--k-gallery", 4,
                                      "--no-report")]) == 0
    rows = {video.parse_ref(r["image_path"]).frame: float(r["score"]) for r in read_rows(root / "ref" / "scores.csv")}
    with h5py.File(root / "ref" / "maps.h5") as h:
        maps = {video.parse_ref(p.decode()).frame: m for p, m in zip(h["path"][:], h["maps"][:])}
    return root, corpus, test, rows, maps


def test_a_video_played_as_a_camera_is_scored_frame_by_frame_with_stage2_only_above_tau(line, capsys):
    root, corpus, test, ref, ref_maps = line
    tau = (max(ref[f] for f in range(9)) + min(ref[f] for f in range(9, 18))) / 2
    out = root / "watched"
    code = cli.main([str(a) for a in ("watch", test, corpus, "--out", out, *RUN, "--k-gallery", 4, "--tau", tau,
                                      "--buffer", 100)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["ended"] == "source ended" and summary["dropped"] == 0
    assert summary["scored"] == summary["read"] == 18 and summary["flagged"] == 9
    rows = read_rows(out / "scores.csv")
    frames = [video.parse_ref(r["image_path"]).frame for r in rows]
    assert frames == list(range(18))  # in the order the source gave them, each once
    for r, f in zip(rows, frames):
        assert float(r["score"]) == ref[f]  # the same bits as the batch command on the same frames
        assert r["is_anomalous"] == str(int(f >= 9))
        assert bool(r["overlay"]) == (f >= 9)
    with h5py.File(out / "maps.h5") as h:  # maps only for the frames above tau: the gating
        mapped = {video.parse_ref(p.decode()).frame: m for p, m in zip(h["path"][:], h["maps"][:])}
    assert sorted(mapped) == list(range(9, 18))
    for f, m in mapped.items():
        np.testing.assert_array_equal(m, ref_maps[f])
    assert sorted(os.listdir(out / "overlays" / root.name)) == [f"test_f{f:06d}.png" for f in range(9, 18)]
    assert json.loads((out / "run.json").read_text())["runs"][-1]["watch"]["scored"] == 18


def _metrics(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("spade_watch")}


def test_a_fast_source_drops_frames_is_measured_and_stops_cleanly_on_sigterm(line, tmp_path):
    root, corpus, _, _, _ = line
    fast = write_video(tmp_path / "fast.avi", scene(30, 40), fps=400.0)  # far faster than scoring
    port = free_port()
    out = tmp_path / "run"
    proc = subprocess.Popen([*SPADE, "watch", fast, str(corpus), "--out", str(out), *RUN, "--k-gallery", "4",
                             "--maps", "none", "--loop", "--metrics-port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics, deadline = {}, time.monotonic() + 120
        while metrics.get("spade_watch_frames_scored_total", 0) < 3:  # progress, observed
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no progress"
            try:
                metrics = _metrics(port)
            except OSError:
                pass
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["ended"] == "stopped by SIGTERM" and summary["dropped"] > 0
    assert summary["read"] - summary["dropped"] - summary["scored"] in (0, 1)  # at most the buffer's one frame
    assert len(read_rows(out / "scores.csv")) == summary["scored"]  # every scored frame committed
    assert metrics["spade_watch_frames_dropped_total"] > 0 and metrics["spade_watch_lag_seconds"] >= 0
    frames = [video.parse_ref(r["image_path"]).frame for r in read_rows(out / "scores.csv")]
    assert frames == sorted(frames) and max(frames) > 40  # newest frames taken; looping numbers on


def test_a_growing_folder_gives_each_new_image_once(line, tmp_path):
    root, corpus, _, _, _ = line
    folder = tmp_path / "incoming"
    folder.mkdir()
    out = tmp_path / "run"
    proc = subprocess.Popen([*SPADE, "watch", str(folder), str(corpus), "--out", str(out), *RUN, "--k-gallery", "4",
                             "--maps", "all", "--buffer", "10", "--max-frames", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        frames = scene(40, 3)
        for k, f in enumerate(frames):
            write_png(folder / f".{k}.png", f)  # written under a hidden name, then renamed: never half-read
            os.replace(folder / f".{k}.png", folder / f"{k:03d}.png")
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["ended"] == "--max-frames reached"
    rows = read_rows(out / "scores.csv")
    assert [os.path.basename(r["image_path"]) for r in rows] == ["000.png", "001.png", "002.png"]


def test_a_source_that_cannot_be_opened_is_one_line_before_any_row(line, tmp_path, capsys):
    _, corpus, _, _, _ = line
    bad = tmp_path / "notes.txt"
    bad.write_text("x")
    for source, message in ((bad, "not a camera index"), (tmp_path / "gone.avi", "no such file"),
                            ("rtsp://127.0.0.1:9/none", "cannot be opened")):
        code = cli.main([str(a) for a in ("watch", source, corpus, "--out", tmp_path / "r", *RUN, "--maps", "none")])
        assert code == cli.EXIT_ERROR and message in capsys.readouterr().err
    assert not (tmp_path / "r" / "scores.csv").exists()
