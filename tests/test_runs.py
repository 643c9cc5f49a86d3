"""Run files: manifest (new, resumed, refused, restarted), score rows, maps, overlays named by
class, errors once each; a reader of all shards."""


import h5py
import numpy as np
import pytest

from spade_faiss.apps import runs
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
    runs.open_run(run, MANIFEST)
    assert runs.read_manifest(run)["corpus"] == "/c.h5"
    runs.open_run(run, dict(MANIFEST, started="later"))  # not a key: resumes
    with pytest.raises(ValueError, match=r"made differently \(scoring: .*k_gallery.*--restart"):
        runs.open_run(run, dict(MANIFEST, scoring={"k_gallery": 10}))
    writer = runs.RunWriter(run, 8, 10, colour_max=2.0)
    writer.write([result("/d/good/a.png", 1.0)])
    runs.open_run(run, dict(MANIFEST, scoring={"k_gallery": 10}), restart=True)
    assert runs.read_run(run) == [] and not (run / "maps.h5").exists() and not (run / "overlays").exists()
    assert runs.read_manifest(run)["scoring"] == {"k_gallery": 10}
    runs.record_invocation(run, {"scored": 3})
    assert runs.read_manifest(run)["runs"] == [{"scored": 3}]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "scores.csv").write_text("image_path,score\n/x.png,1\n")
    with pytest.raises(ValueError, match="without run.json"):
        runs.open_run(tmp_path / "old", MANIFEST)


def test_writer_rows_maps_overlays_and_errors(tmp_path):
    writer = runs.RunWriter(tmp_path, 8, 10, colour_max=2.0, theta=1.0)
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
    again = runs.RunWriter(tmp_path, 8, 10, colour_max=2.0)
    again.write([result("/x/good/a.png", 0.6)])
    name = runs.read_rows(tmp_path / "scores.csv")[-1]["overlay"]
    assert name.startswith("overlays/good/a-") and name.endswith(".png") and (tmp_path / name).is_file()
    assert again.is_done("/d/crack/a.png") and again.is_done("/d/bad.png") and not again.is_done("/new.png")


def test_shards_are_read_as_one_run(tmp_path):
    for i in range(2):
        w = runs.RunWriter(tmp_path, 8, 10, shard_index=i, num_shards=2)
        w.write([result(f"/d/good/{i}.png", float(i))])
    assert [r["image_path"] for r in runs.read_run(tmp_path)] == ["/d/good/0.png", "/d/good/1.png"]
    assert sorted(p.name for p in tmp_path.glob("scores*.csv")) == \
        ["scores.shard-00000-of-00002.csv", "scores.shard-00001-of-00002.csv"]
    row = runs.score_row(result("/a/b/c.png", 2.0))
    assert all(isinstance(v, str) for v in row.values()) and float(row["score"]) == 2.0  # rows are plain text
    assert row["folder"] == "b" and row["image_path"] == "/a/b/c.png"
