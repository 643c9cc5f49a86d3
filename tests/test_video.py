"""Videos as sources (issue 37): real video files written with OpenCV (FFmpeg backend), every
sampled frame an item addressed by its frame reference; frames equal a sequential decode."""

import json
import os

import cv2
import numpy as np
import pytest

from spade_faiss import datasets, images, video
from spade_faiss.apps import cli
from spade_faiss.apps.runs import read_rows
from spade_faiss.synthetic import paste_defect, texture
from spade_faiss.video import Sampling

from .conftest import FEAT, RUN

FPS = 10.0


def write_video(path, frames, fps=FPS, fourcc="MJPG"):
    h, w = frames[0].shape[:2]
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert out.isOpened()
    for f in frames:
        out.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    out.release()
    return str(path)


def scene(seed, n, size=(96, 96), defect_from=None):
    """A texture drifting across the frames (a camera over a moving part); from frame
    ``defect_from`` on, a pasted defect."""
    rng = np.random.default_rng(seed)
    big = texture(rng, (size[0] + n, size[1] + n))
    frames = [np.ascontiguousarray(big[i:i + size[0], i:i + size[1]]) for i in range(n)]
    if defect_from is not None:
        for i in range(defect_from, n):
            frames[i] = paste_defect(np.random.default_rng(seed + 1), frames[i])[0]
    return frames


def sequential(path):
    """The oracle: every frame of a video by plain sequential reading, RGB."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            return frames
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("v") / "line.avi", scene(0, 30))


def test_frames_are_items_with_index_and_time_and_equal_a_sequential_decode(clip):
    refs = datasets.discover(clip, sampling=Sampling(stride=5))
    assert [s.path for s in refs] == [f"{clip}#frame={i}&t={i / FPS:.3f}" for i in range(0, 30, 5)]
    want = sequential(clip)
    assert len(want) == 30
    for s in refs[::-1] + refs:  # backwards (reopens) and forwards (reads on)
        ref = video.parse_ref(s.path)
        img = images.load_image(s.path)
        np.testing.assert_array_equal(img.rgb, want[ref.frame])
        assert img.sha256 == images.sha256_bytes(want[ref.frame].tobytes()) == images.content_sha256(s.path)
    timed = datasets.discover(clip, sampling=Sampling(stride=2, start_s=1.05, end_s=2.0))
    assert [video.parse_ref(s.path).frame for s in timed] == [11, 13, 15, 17, 19]
    for bad in (dict(stride=0), dict(start_s=-1.0), dict(start_s=2.0, end_s=1.0), dict(end_s=float("nan"))):
        with pytest.raises(ValueError):
            Sampling(**bad)
    with pytest.raises(ValueError, match="no frame in the time range"):
        datasets.discover(clip, sampling=Sampling(start_s=100.0))


def test_a_folder_of_videos_and_a_list_file_mix_images_and_frames(tmp_path, clip):
    folder = tmp_path / "src"
    folder.mkdir()
    write_video(folder / "a.avi", scene(1, 6))
    cv2.imwrite(str(folder / "still.png"), scene(2, 1)[0])
    paths = [s.path for s in datasets.discover(folder, sampling=Sampling(stride=3))]
    assert paths == [f"{folder / 'a.avi'}#frame={i}&t={i / FPS:.3f}" for i in (0, 3)] + [str(folder / "still.png")]
    listed = tmp_path / "list.txt"
    listed.write_text(f"{clip}\n{folder / 'still.png'}\n")
    assert len(datasets.discover(listed, sampling=Sampling(stride=10))) == 3 + 1


def test_a_truncated_video_keeps_the_frames_read_and_reports_the_rest(tmp_path, clip):
    data = open(clip, "rb").read()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    refs = datasets.discover(cut)  # the container still declares 30 frames (or fewer)
    loaded, failed = [], []
    for s in refs:
        try:
            loaded.append(images.load_image(s.path))
        except images.ImageError as e:
            failed.append(str(e))
    assert 5 <= len(loaded) < 30 and len(loaded) + len(failed) == len(refs)
    want = sequential(cut)
    for img in loaded:
        np.testing.assert_array_equal(img.rgb, want[video.parse_ref(img.path).frame])
    assert all("not readable (the video ends, or is damaged, at frame" in e for e in failed)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="not a readable video"):
        datasets.discover(junk)


def test_index_and_score_videos_end_to_end_resumable_per_frame(tmp_path, capsys):
    """Normal videos indexed (every 2nd frame), a test video scored (every 3rd): rows are frame
    references in order, overlays are named by video and frame, the defect frames score
    higher, and a run cut after its 3rd frame resumes from the next one with the same bits."""
    normals = tmp_path / "normals"
    normals.mkdir()
    for k in range(3):
        write_video(normals / f"n{k}.avi", scene(10 + k, 12))
    test = write_video(tmp_path / "test.avi", scene(20, 18, defect_from=9))

    def run(*argv):
        code = cli.main([str(a) for a in argv])
        return code, capsys.readouterr().out

    code, out = run("index", normals, "--out", tmp_path / "c.h5", *FEAT, "--frame-stride", 2)
    assert code == 0 and json.loads(out)["added"] == 18
    code, out = run("score", tmp_path / "c.h5", test, "--out", tmp_path / "run", *RUN, "--frame-stride", 3,
                    "--k-gallery", 4)
    assert code == 0
    rows = read_rows(tmp_path / "run" / "scores.csv")
    frames = [video.parse_ref(r["image_path"]).frame for r in rows]
    assert sorted(frames) == list(range(0, 18, 3))
    by_frame = {video.parse_ref(r["image_path"]).frame: float(r["score"]) for r in rows}
    assert min(by_frame[f] for f in (9, 12, 15)) > max(by_frame[f] for f in (0, 3, 6))
    assert sorted(os.listdir(tmp_path / "run" / "overlays" / tmp_path.name)) == \
        [f"test_f{f:06d}.png" for f in range(0, 18, 3)]
    import h5py
    with h5py.File(tmp_path / "run" / "maps.h5") as h:
        first = dict(zip([p.decode() for p in h["path"][:]], h["maps"][:]))
    lines = (tmp_path / "run" / "scores.csv").read_text().splitlines(keepends=True)
    (tmp_path / "run" / "scores.csv").write_text("".join(lines[:4]))  # 3 frames committed
    code, out = run("score", tmp_path / "c.h5", test, "--out", tmp_path / "run", *RUN, "--frame-stride", 3,
                    "--k-gallery", 4)
    assert code == 0 and json.loads(out)["skipped_done"] == 3 and json.loads(out)["scored"] == 3
    with h5py.File(tmp_path / "run" / "maps.h5") as h:
        for p, m in zip([p.decode() for p in h["path"][:]], h["maps"][:]):
            np.testing.assert_array_equal(m, first[p])
    code, _ = run("score", tmp_path / "c.h5", test, "--out", tmp_path / "bad", *RUN, "--frame-stride", 0)
    assert code == cli.EXIT_ERROR


def test_frame_scores_smoothed_along_each_video_equal_an_explicit_gaussian(tmp_path, capsys):
    """frames.csv: each video's frames in order, the raw score, the score smoothed by a Gaussian
    of sigma frames (an explicit kernel here, ends repeated), the decision on the smoothed one;
    two videos never mix."""
    normals = tmp_path / "normals"
    normals.mkdir()
    write_video(normals / "n.avi", scene(30, 10))
    tests = tmp_path / "tests"
    tests.mkdir()
    write_video(tests / "a.avi", scene(31, 12, defect_from=6))
    write_video(tests / "b.avi", scene(32, 9))
    assert cli.main(["index", str(normals), "--out", str(tmp_path / "c.h5"), *FEAT]) == 0
    capsys.readouterr()
    sigma, tau = 1.5, 30.0
    assert cli.main(["score", str(tmp_path / "c.h5"), str(tests), "--out", str(tmp_path / "run"), *RUN,
                     "--k-gallery", "3", "--temporal-sigma", str(sigma), "--tau", str(tau), "--no-report"]) == 0
    scores = {r["image_path"]: float(r["score"]) for r in read_rows(tmp_path / "run" / "scores.csv")}
    frames = read_rows(tmp_path / "run" / "frames.csv")
    assert [(os.path.basename(r["video"]), int(r["frame"])) for r in frames] == \
        [("a.avi", i) for i in range(12)] + [("b.avi", i) for i in range(9)]
    radius = int(4 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for name in ("a.avi", "b.avi"):
        rows = [r for r in frames if r["video"].endswith(name)]
        raw = np.array([scores[r["image_path"]] for r in rows])
        padded = np.concatenate([np.full(radius, raw[0]), raw, np.full(radius, raw[-1])])
        want = np.convolve(padded, kernel, mode="valid")
        np.testing.assert_allclose([float(r["smoothed_score"]) for r in rows], want, rtol=1e-5)
        assert [float(r["score"]) for r in rows] == pytest.approx(list(raw), rel=1e-6)
        assert [int(r["is_anomalous"]) for r in rows] == [int(float(r["smoothed_score"]) > tau) for r in rows]
        assert all(float(r["time_s"]) == pytest.approx(int(r["frame"]) / FPS) for r in rows)
    runs = json.loads((tmp_path / "run" / "run.json").read_text())["runs"]
    assert runs[-1]["temporal_sigma"] == sigma and runs[-1]["frames"] == 21


def test_a_lossless_video_scores_bitwise_as_its_frames_saved_as_image_files(tmp_path, capsys):
    """FFV1 (lossless): every frame's score and map equal those of the same frame written as a
    PNG file and scored as an image, bit for bit."""
    from spade_faiss.synthetic import write_png

    normals = tmp_path / "normals"
    normals.mkdir()
    write_video(normals / "n.avi", scene(40, 10))
    frames = scene(41, 8, defect_from=4)
    clip = write_video(tmp_path / "line.mkv", frames, fourcc="FFV1")
    assert [np.array_equal(a, b) for a, b in zip(sequential(clip), frames)] == [True] * 8  # lossless
    for i, f in enumerate(frames):
        write_png(tmp_path / "pngs" / f"{i:03d}.png", f)
    assert cli.main(["index", str(normals), "--out", str(tmp_path / "c.h5"), *FEAT]) == 0
    for src, run in ((clip, "video_run"), (tmp_path / "pngs", "png_run")):
        assert cli.main(["score", str(tmp_path / "c.h5"), str(src), "--out", str(tmp_path / run), *RUN,
                         "--k-gallery", "3", "--no-report"]) == 0
    video_rows, png_rows = (read_rows(tmp_path / r / "scores.csv") for r in ("video_run", "png_run"))
    assert [video.parse_ref(r["image_path"]).frame for r in video_rows] == list(range(8))
    assert [r["score"] for r in video_rows] == [r["score"] for r in png_rows]
    import h5py
    with h5py.File(tmp_path / "video_run" / "maps.h5") as a, h5py.File(tmp_path / "png_run" / "maps.h5") as b:
        np.testing.assert_array_equal(a["maps"][:], b["maps"][:])


def test_a_run_killed_mid_video_resumes_from_the_next_frame_with_the_same_bits(tmp_path):
    """kill -9 while a video is scored (after some frames are committed, observed in scores.csv):
    the re-run scores only the frames left, and the run equals an uninterrupted one."""
    import signal
    import subprocess
    import sys
    import time

    import h5py

    normals = tmp_path / "normals"
    normals.mkdir()
    write_video(normals / "n.avi", scene(50, 10))
    test = write_video(tmp_path / "t.avi", scene(51, 40, defect_from=20))
    assert cli.main(["index", str(normals), "--out", str(tmp_path / "c.h5"), *FEAT]) == 0
    argv = [sys.executable, "-m", "spade_faiss", "score", str(tmp_path / "c.h5"), test, *RUN, "--k-gallery", "3",
            "--no-report", "--batch-size", "1"]
    proc = subprocess.Popen([*argv, "--out", str(tmp_path / "run")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    scores, deadline = tmp_path / "run" / "scores.csv", time.monotonic() + 120
    while not (scores.is_file() and len(read_rows(scores)) >= 3):  # progress, observed
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(read_rows(scores))
    assert done < 40
    assert subprocess.run([*argv, "--out", str(tmp_path / "run")], capture_output=True).returncode == 0
    assert subprocess.run([*argv, "--out", str(tmp_path / "whole")], capture_output=True).returncode == 0
    resumed, whole = read_rows(scores), read_rows(tmp_path / "whole" / "scores.csv")
    assert [r["image_path"] for r in resumed] == [r["image_path"] for r in whole]  # each frame once, in order
    assert [r["score"] for r in resumed] == [r["score"] for r in whole]
    with h5py.File(tmp_path / "run" / "maps.h5") as a, h5py.File(tmp_path / "whole" / "maps.h5") as b:
        np.testing.assert_array_equal(a["maps"][:], b["maps"][:])


def _oracle_choice(videos: list[np.ndarray], fpr: float, event: int, sigmas) -> tuple[float, float]:
    """The documented choice of the smoothing width, computed independently: explicit Gaussian
    kernels, frames within the kernel's reach of a video's end left out, the threshold by
    sorting, the event's response by convolving an explicit box."""
    best = None
    for sigma in sigmas:
        r = int(4 * sigma + 0.5)
        kernel = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2) if sigma else np.ones(1)
        kernel /= kernel.sum()
        inner = []
        for raw in videos:
            padded = np.concatenate([np.full(r, raw[0]), raw, np.full(r, raw[-1])])
            inner.extend(np.convolve(padded, kernel, mode="valid")[r:len(raw) - r])
        if len(inner) < 20:
            continue
        s = np.sort(inner)
        tau = s[len(s) - 1 - int(np.floor(fpr * len(s)))]
        box = np.zeros(event + 2 * r + 2)
        box[r + 1:r + 1 + event] = 1
        peak = np.convolve(box, kernel, mode="same")[r + 1 + (event - 1) // 2]
        need = (tau - np.median(inner)) / peak
        if best is None or need < best[0] - 1e-12:
            best = (need, sigma, tau)
    return best[1], best[2]


def test_the_smoothing_width_is_chosen_on_held_out_normal_frames_only_and_used_by_score(tmp_path, capsys):
    """calibrate on held-out normal videos chooses the temporal width (the documented rule,
    recomputed here from those frames' scores alone: no test frame or label is an input), and
    score uses it with the smoothed frames' threshold unless --temporal-sigma is given."""
    from spade_faiss import Spade
    from spade_faiss.temporal import SIGMAS

    for name, content in (("normals", [("n.avi", scene(30, 10))]),
                          ("held", [("h1.avi", scene(50, 36)), ("h2.avi", scene(51, 36))]),
                          ("tests", [("a.avi", scene(31, 24, defect_from=10))])):
        (tmp_path / name).mkdir()
        for file, frames in content:
            write_video(tmp_path / name / file, frames)
    corpus = str(tmp_path / "c.h5")
    assert cli.main(["index", str(tmp_path / "normals"), "--out", corpus, *FEAT]) == 0
    assert cli.main(["calibrate", corpus, str(tmp_path / "held"), *RUN, "--k-gallery", "3", "--fpr", "0.05",
                     "--event-s", "0.6"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["temporal"]
    assert record["event_frames"] == 6 and record["frames"] == 72 and len(record["tried"]) >= 6

    held = datasets.discover(str(tmp_path / "held"), split="train")
    with Spade.open(corpus, k_gallery=3, device="cpu") as spade:
        spade.load_backbone()
        scored = list(spade.iter_score(held, maps=False))
    by_video = {}
    for r in scored:
        ref = video.parse_ref(r.path)
        by_video.setdefault(ref.video, []).append((ref.frame, r.score))
    sequences = [np.array([s for _, s in sorted(v)]) for _, v in sorted(by_video.items())]
    sigma, tau = _oracle_choice(sequences, 0.05, 6, SIGMAS)
    assert record["sigma"] == sigma and record["tau"] == pytest.approx(tau, rel=1e-12)

    assert cli.main(["score", corpus, str(tmp_path / "tests"), "--out", str(tmp_path / "run"), *RUN,
                     "--k-gallery", "3", "--no-report"]) == 0
    last = json.loads((tmp_path / "run" / "run.json").read_text())["runs"][-1]
    assert (last["temporal_sigma"], last["temporal_sigma_from"], last["frames_tau"]) == \
        (record["sigma"], "calibration", record["tau"])
    rows = read_rows(tmp_path / "run" / "frames.csv")
    assert [int(r["is_anomalous"]) for r in rows] == [int(float(r["smoothed_score"]) > record["tau"]) for r in rows]
    assert cli.main(["score", corpus, str(tmp_path / "tests"), "--out", str(tmp_path / "run2"), *RUN,
                     "--k-gallery", "3", "--no-report", "--temporal-sigma", "0"]) == 0
    last = json.loads((tmp_path / "run2" / "run.json").read_text())["runs"][-1]
    assert (last["temporal_sigma"], last["temporal_sigma_from"]) == (0.0, "--temporal-sigma")
    assert last["frames_tau"] == json.loads((tmp_path / "run2" / "run.json").read_text())["tau"]
