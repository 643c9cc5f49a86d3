"""Run files: manifest (new, resumed, refused, restarted), score rows, maps, overlays named by
class, errors once each; a reader of all shards."""


import h5py
import numpy as np
import pytest

from spade_faiss.apps import pictures, run_writer, runs
from spade_faiss.apps.runs import RunDir
from spade_faiss.images import LoadedImage
from spade_faiss.results import ScoredImage

MANIFEST = {"corpus": "/c.h5", "corpus_created": "t", "corpus_images": 3, "weights_sha256": "ab",
            "scoring": {"k_gallery": 5}, "maps": "all", "tau": None, "theta": None}


def result(path, score, with_map=True, size=(10, 12)):
    amap = np.full((8, 8), score, np.float32) if with_map else None
    image = LoadedImage(path, "0" * 64, np.zeros((*size, 3), np.uint8))
    return ScoredImage(path, None, score, None, amap, np.array([0, 1]), np.array([0.1, 0.2], np.float32),
                       ["/n/a.png"], image)


def test_manifest_new_resumed_refused_and_restarted(tmp_path):
    run = tmp_path / "run"
    RunDir(run).open(MANIFEST)
    assert runs.RunDir(run).manifest()["corpus"] == "/c.h5"
    RunDir(run).open(dict(MANIFEST, started="later"))  # not a key: resumes
    with pytest.raises(ValueError, match=r"made differently \(scoring: .*k_gallery.*--restart"):
        RunDir(run).open(dict(MANIFEST, scoring={"k_gallery": 10}))
    writer = RunDir(run).writer(8, 10, colour_max=2.0)
    writer.write([result("/d/good/a.png", 1.0)])
    RunDir(run).open(dict(MANIFEST, scoring={"k_gallery": 10}), restart=True)
    assert runs.RunDir(run).score_rows() == [] and not (run / "maps.h5").exists() and not (run / "overlays").exists()
    assert runs.RunDir(run).manifest()["scoring"] == {"k_gallery": 10}
    RunDir(run).record_invocation({"scored": 3})
    assert runs.RunDir(run).manifest()["runs"] == [{"scored": 3}]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "scores.csv").write_text("image_path,score\n/x.png,1\n")
    with pytest.raises(ValueError, match="without run.json"):
        RunDir(tmp_path / "old").open(MANIFEST)


def test_writer_rows_maps_overlays_and_errors(tmp_path):
    writer = RunDir(tmp_path).writer(8, 10, colour_max=2.0, theta=1.0)
    writer.write([result("/d/good/a.png", 0.5), result("/d/crack/a.png", 1.5),
                  ScoredImage("/d/bad.png", None, error="/d/bad.png: empty file"),
                  result("/e/good/a.png", 0.7, with_map=False)])
    writer.write([ScoredImage("/d/bad.png", None, error="/d/bad.png: empty file")])  # listed once
    rows = runs.read_rows(tmp_path / "scores.csv")
    assert [r["image_path"] for r in rows] == ["/d/good/a.png", "/d/crack/a.png", "/e/good/a.png"]
    assert [r["folder"] for r in rows] == ["good", "crack", "good"]
    assert [r["overlay"] for r in rows] == ["overlays/good/a.png", "overlays/crack/a.png", ""]
    assert rows[0]["map_max"] == "0.5" and rows[2]["map_max"] == "" and rows[0]["is_anomalous"] == ""
    assert (tmp_path / "overlays" / "good" / "a.png").is_file()
    with h5py.File(tmp_path / "maps.h5") as h:
        assert [p.decode() for p in h["path"][:]] == [r["image_path"] for r in rows]
        np.testing.assert_array_equal(h["maps"][:, 0, 0], [0.5, 1.5, 0.0])  # zeros where no map
    assert [e["image_path"] for e in runs.read_rows(tmp_path / "errors.csv")] == ["/d/bad.png"]
    # The same overlay name for another image in the same folder gets a hash of the path.
    again = RunDir(tmp_path).writer(8, 10, colour_max=2.0)
    again.write([result("/x/good/a.png", 0.6)])
    name = runs.read_rows(tmp_path / "scores.csv")[-1]["overlay"]
    assert name.startswith("overlays/good/a-") and name.endswith(".png") and (tmp_path / name).is_file()
    assert again.is_done("/d/crack/a.png") and not again.is_done("/new.png")
    assert not again.is_done("/d/bad.png")  # failed before: tried again (a repaired file gets scored)
    again.write([ScoredImage("/d/bad.png", None, error="/d/bad.png: empty file")])  # still broken: listed once
    assert [e["image_path"] for e in runs.read_rows(tmp_path / "errors.csv")] == ["/d/bad.png"]
    again.write([result("/d/bad.png", 0.9)])  # repaired: scored, and no longer reported as skipped
    assert RunDir(tmp_path).error_rows() == []


def test_a_resumed_writer_cuts_map_rows_a_crash_left_past_the_csv(tmp_path):
    writer = RunDir(tmp_path).writer(8, 10)
    writer.write([result("/d/good/a.png", 0.5), result("/d/good/b.png", 0.6)])
    with h5py.File(tmp_path / "maps.h5", "a") as h:  # a crash between the maps and the CSV rows
        for name in ("maps", "path"):
            h[name].resize(3, axis=0)
    RunDir(tmp_path).writer(8, 10)
    with h5py.File(tmp_path / "maps.h5") as h:
        assert h["maps"].shape[0] == h["path"].shape[0] == len(runs.read_rows(tmp_path / "scores.csv")) == 2


def test_shards_are_read_as_one_run(tmp_path):
    for i in range(2):
        w = RunDir(tmp_path).writer(8, 10, shard_index=i, num_shards=2)
        w.write([result(f"/d/good/{i}.png", float(i))])
    assert [r["image_path"] for r in runs.RunDir(tmp_path).score_rows()] == ["/d/good/0.png", "/d/good/1.png"]
    assert sorted(p.name for p in tmp_path.glob("scores*.csv")) == \
        ["scores.shard-00000-of-00002.csv", "scores.shard-00001-of-00002.csv"]
    row = run_writer.score_row(result("/a/b/c.png", 2.0))
    assert all(isinstance(v, str) for v in row.values()) and float(row["score"]) == 2.0  # rows are plain text
    assert row["folder"] == "b" and row["image_path"] == "/a/b/c.png"


def test_restart_clears_every_result_and_nothing_else(tmp_path):
    run = RunDir(tmp_path).open(MANIFEST)
    run.writer(8, 10, colour_max=2.0).write([result("/d/good/a.png", 1.0)])
    for p in [run.report, run.metrics, run.table, run.plot("roc"), run.explain / "good" / "a.png"]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    (tmp_path / "corpus.h5").write_text("kept")  # an evaluation's corpus lives beside its run
    run.open(MANIFEST, restart=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.h5", "run.json"]
    assert run.explain_sheets() == [] and run.score_rows() == [] and run.metrics_record() is None


def test_score_into_run_writes_observes_and_returns_the_failures(tmp_path):
    run = RunDir(tmp_path)
    seen, progress = [], []
    bad = ScoredImage("/d/bad.png", None, error="/d/bad.png: empty file")
    errors = runs.score_into_run(iter([result("/d/good/a.png", 1.0), bad]), run.writer(8, 10), seen.append,
                                 on_progress=progress.append)
    assert errors == [("/d/bad.png", "/d/bad.png: empty file")]
    assert [r.path for r in seen] == ["/d/good/a.png", "/d/bad.png"] and progress == [1, 1]
    assert [r["image_path"] for r in run.score_rows()] == ["/d/good/a.png"]
    assert [r["image_path"] for r in run.error_rows()] == ["/d/bad.png"]


def test_scoring_runs_ahead_of_writing_by_at_most_one_batch_and_every_handed_result_is_committed(tmp_path):
    """The writer thread commits rows in input order, behind the scoring loop by at most
    WRITE_BEHIND results; when the loop stops (here a scoring error after 11 results) the
    results handed over are all committed before the error comes out."""
    import threading

    run = RunDir(tmp_path)
    writer = run.writer(8, 10)
    gate, ahead, written = threading.Event(), [], []
    real_write = writer.write

    def slow_write(results):  # the first write waits until the loop has run as far ahead as it may
        gate.wait(timeout=60)
        real_write(results)
        written.extend(r.path for r in results)

    writer.write = slow_write

    def scored():
        for i in range(11):
            ahead.append(i - len(written))  # results handed over and not yet written, before this one
            if i == runs.WRITE_BEHIND + 1:
                gate.set()  # the queue is full and the writer holds one: the loop had to wait
            yield result(f"/d/good/{i:02d}.png", float(i))
        raise RuntimeError("scoring failed")

    with pytest.raises(RuntimeError, match="scoring failed"):
        runs.score_into_run(scored(), writer)
    assert max(ahead) == runs.WRITE_BEHIND + 1  # the queue and the one being written
    assert [r["image_path"] for r in run.score_rows()] == [f"/d/good/{i:02d}.png" for i in range(11)]


def test_a_failed_write_stops_the_run_and_nothing_is_written_after_it(tmp_path):
    run = RunDir(tmp_path)
    writer = run.writer(8, 10)
    real_write = writer.write

    def write(results):
        if results[0].path.endswith("03.png"):
            raise OSError("disk full")
        real_write(results)

    writer.write = write
    handed = []

    def scored():
        for i in range(40):
            handed.append(i)
            yield result(f"/d/good/{i:02d}.png", float(i))

    with pytest.raises(OSError, match="disk full"):
        runs.score_into_run(scored(), writer)
    assert [r["image_path"] for r in run.score_rows()] == [f"/d/good/{i:02d}.png" for i in range(3)]
    assert len(handed) < 40  # the loop stopped


def test_only_the_run_directory_names_its_files():
    """Every other module asks RunDir for a run's paths (one owner for each file name)."""
    import re
    from pathlib import Path

    import spade_faiss

    owners = {"runs.py", "run_writer.py"}
    pattern = re.compile(r"""glob\(["'](scores|errors|maps)|/ ["'](explain|overlays|run\.json|metrics\.json|"""
                         r"""report\.html|table\.md|roc\.png|pro\.png|worst_cases\.png)["']""")
    found = [f"{p.name}:{i}" for p in Path(spade_faiss.__file__).parent.rglob("*.py") if p.name not in owners
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_the_colour_scale_of_a_calibrated_corpus_estimates_nothing():
    """Twice theta when calibrated, without the leave-one-out estimate (stage 2 over corpus
    images); that estimate only when there is no pixel threshold."""
    class Calibrated:
        theta_ = 0.4

        def leave_one_out_theta(self):
            raise AssertionError("estimated although calibrated")

    class Uncalibrated:
        theta_ = None

        def leave_one_out_theta(self):
            return 1.5

    assert pictures.colour_scale(Calibrated()) == 0.8
    assert pictures.colour_scale(Uncalibrated()) == 3.0
