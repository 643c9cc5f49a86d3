"""Tiles of high-resolution images as items (issue 38): a tiled score equals scoring the tiles one
by one as image files against a corpus of the normal images' tiles, bit for bit; the stitched map
is the mean of the covering tiles' maps, computed here independently."""


import h5py
import numpy as np
import pytest

from spade_faiss import images, tiles
from spade_faiss.apps import cli
from spade_faiss.apps.runs import read_rows
from spade_faiss.apps.stitching import stitched_map
from spade_faiss.scoring import map_to_original
from spade_faiss.synthetic import paste_defect, texture, write_png

from .conftest import FEAT, RUN

TILE, OVERLAP = ["--tile", "64", "--tile-overlap", "24"], 24


@pytest.mark.parametrize("length", [1, 40, 64, 65, 100, 104, 200, 233])
@pytest.mark.parametrize("size, overlap", [(64, 0), (64, 24), (64, 63)])
def test_tiles_cover_every_pixel_with_full_tiles_flush_with_the_far_edge(length, size, overlap):
    starts = tiles.origins(length, size, overlap)
    side = min(size, length)
    covered = np.zeros(length, int)
    for s in starts:
        covered[s:s + side] += 1
        assert 0 <= s and s + side <= length
    assert covered.min() >= 1 and starts == sorted(set(starts)) and starts[0] == 0
    assert starts[-1] == length - side
    steps = np.diff(starts)
    assert (steps[:-1] == size - overlap).all() and (len(steps) == 0 or 0 < steps[-1] <= size - overlap)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Normal parts (128x160, non-square), test parts (two with a pasted defect), the tiled
    corpus and run, and the same tiles written as image files with their own corpus and run."""
    root = tmp_path_factory.mktemp("parts")
    rng = np.random.default_rng(5)
    for split, n in (("normal", 4), ("test", 3)):
        (root / split).mkdir()
        for k in range(n):
            img = texture(rng, (128, 160))
            if split == "test" and k:
                img = paste_defect(rng, img)[0]
            write_png(root / split / f"{k:03d}.png", img)

    def tile_files(split):  # every tile of every image as its own PNG, in the tiled order
        folder = root / f"{split}_tiles"
        folder.mkdir()
        names = {}
        for k, path in enumerate(sorted((root / split).iterdir())):
            for j, ref in enumerate(tiles.list_tiles(str(path), tiles.Tiling(64, OVERLAP))):
                rgb = images.load_image(str(path)).rgb[ref.y:ref.y + ref.h, ref.x:ref.x + ref.w]
                out = folder / f"{k:03d}_{j:03d}.png"
                write_png(out, rgb)
                names[ref.path] = str(out)
        return names

    files = {**tile_files("normal"), **tile_files("test")}
    run = lambda *a: cli.main([str(x) for x in a])  # noqa: E731
    assert run("index", root / "normal", "--out", root / "tiled.h5", *FEAT, *TILE) == 0
    assert run("index", root / "normal_tiles", "--out", root / "files.h5", *FEAT) == 0
    common = (*RUN, "--k-gallery", 6, "--no-report")
    assert run("score", root / "tiled.h5", root / "test", "--out", root / "tiled_run", *common, *TILE) == 0
    assert run("score", root / "files.h5", root / "test_tiles", "--out", root / "files_run", *common) == 0
    return root, files


def _maps(run):
    with h5py.File(run / "maps.h5") as h:
        return dict(zip([p.decode() for p in h["path"][:]], h["maps"][:]))


def test_a_tiled_score_equals_its_tiles_scored_as_images_against_a_corpus_of_tiles(parts):
    root, files = parts
    tiled = read_rows(root / "tiled_run" / "scores.csv")
    alone = {r["image_path"]: r for r in read_rows(root / "files_run" / "scores.csv")}
    assert len(tiled) == 3 * 12  # 128x160 at 64/24: 3 rows x 4 columns of tiles per image
    tiled_maps, alone_maps = _maps(root / "tiled_run"), _maps(root / "files_run")
    for r in tiled:
        twin = alone[files[r["image_path"]]]
        assert r["score"] == twin["score"] and r["map_max"] == twin["map_max"]
        # the neighbours are the same normal tiles (references in one corpus, files in the other)
        assert [files[p] for p in r["neighbour_paths"].split(";")] == twin["neighbour_paths"].split(";")
        np.testing.assert_array_equal(tiled_maps[r["image_path"]], alone_maps[twin["image_path"]])


def test_the_stitched_map_is_the_mean_of_the_maps_of_the_tiles_covering_each_pixel(parts):
    root, _ = parts
    rows = read_rows(root / "tiled_run" / "scores.csv")
    maps = _maps(root / "tiled_run")
    per_image = read_rows(root / "tiled_run" / "tiled.csv")
    assert [r["image_path"] for r in per_image] == [str(root / "test" / f"{k:03d}.png") for k in range(3)]
    for summary in per_image:
        mine = [r for r in rows if tiles.parse_ref(r["image_path"]).image == summary["image_path"]]
        best = max(mine, key=lambda r: float(r["score"]))
        assert summary["score"] == best["score"] and summary["tile"] == best["image_path"]
        assert int(summary["tiles"]) == 12 and summary["overlay"].startswith("stitched/")
        assert (root / "tiled_run" / summary["overlay"]).is_file()
        # the oracle: per pixel, the values of the tiles whose crop saw it, averaged
        values = [[[] for _ in range(160)] for _ in range(128)]
        for r in mine:
            ref = tiles.parse_ref(r["image_path"])
            m = map_to_original(maps[r["image_path"]], (ref.h, ref.w), 72)
            for y in range(ref.h):
                for x in range(ref.w):
                    if not np.isnan(m[y, x]):
                        values[ref.y + y][ref.x + x].append(float(m[y, x]))
        want = np.array([[np.mean(v) if v else np.nan for v in row] for row in values], np.float32)
        got = stitched_map(root / "tiled_run" / "maps.h5", summary["image_path"],
                           [r["image_path"] for r in mine], 72)
        np.testing.assert_allclose(got, want, rtol=1e-6, equal_nan=True)
        # NaN only in the image's outer margin, which no tile's centre crop reaches (72 -> 64: 4 px)
        assert np.isnan(got).any() and not np.isnan(got[4:-4, 4:-4]).any()
        assert float(summary["map_max"]) == pytest.approx(np.nanmax(got), rel=1e-5)
    defect = [float(r["score"]) for r in per_image]
    assert min(defect[1:]) > defect[0]  # the parts with a defect score above the clean one


def test_tile_options_are_checked_before_any_work(tmp_path, capsys):
    code = cli.main(["index", str(tmp_path), "--out", str(tmp_path / "c.h5"), *FEAT, "--tile", "64",
                     "--tile-overlap", "64"])
    assert code == cli.EXIT_ERROR and "tile_overlap=64" in capsys.readouterr().err
    code = cli.main(["index", str(tmp_path), "--out", str(tmp_path / "c.h5"), *FEAT, "--tile", "8"])
    assert code == cli.EXIT_ERROR and "tile=8" in capsys.readouterr().err
    assert not (tmp_path / "c.h5").exists()


def test_same_position_retrieves_the_nearest_normal_tiles_cut_at_the_tile_s_own_place(parts):
    """``same_position``: a test tile's neighbours are the k_gallery nearest of the corpus tiles at
    its own (x, y, w, h), with the distances of an unrestricted search over the whole corpus (the
    oracle: that full ranking filtered by position); too few tiles at a place is one clear error."""
    from spade_faiss import Spade
    from spade_faiss.scoring import image_scores

    root, _ = parts
    corpus = root / "tiled.h5"
    queries = [r.path for p in sorted((root / "test").iterdir())
               for r in tiles.list_tiles(str(p), tiles.Tiling(64, OVERLAP))]
    with Spade.open(corpus, k_gallery=48, k_image=2) as everything:
        paths = list(everything.paths_)
        full = everything.score(queries, maps=False)
    with Spade.open(corpus, k_gallery=3, k_image=2, same_position=True) as placed:
        got = placed.score(queries, maps=False)
    for i, q in enumerate(queries):
        keep = [j for j, c in enumerate(full.neighbour_ids[i]) if tiles.position(paths[c]) == tiles.position(q)]
        want_ids, want_d = full.neighbour_ids[i][keep][:3], full.neighbour_distances[i][keep][:3]
        np.testing.assert_array_equal(got.neighbour_ids[i], want_ids, err_msg=q)
        np.testing.assert_array_equal(got.neighbour_distances[i], want_d, err_msg=q)
        assert got.image_scores[i] == image_scores(want_d[None], 2)[0]
    assert not np.array_equal(got.neighbour_ids, full.neighbour_ids[:, :3])  # the restriction changed answers
    with Spade.open(corpus, k_gallery=5, same_position=True) as too_many:
        with pytest.raises(ValueError, match=r"same_position: the corpus has 4 tiles at x=0, y=0, 64x64, "
                                             r"k_gallery=5 needs at least 5"):
            too_many.score(queries[:1], maps=False)
