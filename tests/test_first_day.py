"""A quality engineer's first day: each trap a newcomer fell into, reproduced, with the behaviour
and the message that now meet them, each test named after that behaviour (the Ray run layout is
in test_distributed.py, the evaluation plots also in test_evaluation.py)."""

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import cv2
import pytest
import torch
import torchvision

from spade_faiss import backbone
from spade_faiss.apps import cli, pictures, progress
from spade_faiss.apps.runs import RunDir, read_rows
from spade_faiss.synthetic import make_dataset

from .conftest import FEAT, RUN

ROOT = Path(__file__).resolve().parents[1]
# Options whose absence is the default (nothing to state): flags, and where an empty value means "none".
NO_DEFAULT = {"verbose", "ray_address", "token_file", "version"}


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("spade-faiss: error:")]


@pytest.fixture
def corpus(tmp_path, dataset, capsys):
    out = tmp_path / "c.h5"
    assert run(capsys, "index", dataset, "--out", out, *FEAT)[0] == 0
    return out


def test_calibrating_on_indexed_images_is_refused(corpus, dataset, capsys):
    code, _, err = run(capsys, "calibrate", corpus, dataset, *RUN, "--k-gallery", "5")
    assert code == cli.EXIT_ERROR and len(errors(err)) == 1
    assert "is in the corpus: calibrate on held-out normal images" in errors(err)[0]
    assert json.loads(run(capsys, "info", corpus)[1])["thresholds"] is None  # nothing was stored


def test_an_mvtec_root_indexes_train_good_only_and_says_so(tmp_path, dataset, capsys):
    code, out, err = run(capsys, "index", dataset, "--out", tmp_path / "c.h5", *FEAT)
    assert code == 0 and json.loads(out)["added"] == 12  # not the 7 test images nor the 4 masks
    assert "is an MVTec category: using train/good (12 images); test/ and ground_truth/ are left out" in err
    root = tmp_path / "mvtec"
    shutil.copytree(dataset, root / "tile")
    make_dataset(root / "screw", n_train=2, n_good=1, n_defect=1, size=(32, 32))
    code, _, err = run(capsys, "index", root, "--out", tmp_path / "d.h5", *FEAT)
    assert code == cli.EXIT_ERROR and "MVTec dataset root with categories ['screw', 'tile']" in errors(err)[0]
    assert not (tmp_path / "d.h5").exists()


def test_a_run_directory_holds_one_run(tmp_path, corpus, dataset, capsys):
    runs = tmp_path / "run"
    assert run(capsys, "score", corpus, dataset, "--out", runs, *RUN, "--k-gallery", "5", "--no-overlays")[0] == 0
    manifest = RunDir(runs).manifest()
    assert manifest["corpus"] == str(corpus) and manifest["scoring"]["k_gallery"] == 5
    assert manifest["weights_sha256"] and manifest["spade_faiss"] and manifest["runs"][0]["scored"] == 7
    code, out, err = run(capsys, "score", corpus, dataset, "--out", runs, *RUN, "--k-gallery", "3")
    assert code == cli.EXIT_ERROR and "holds a run made differently (scoring:" in errors(err)[0]
    assert "--restart" in errors(err)[0] and out == ""
    other = tmp_path / "other.h5"
    assert run(capsys, "index", dataset, "--out", other, *FEAT, "--seed", "1")[0] == 0
    code, _, err = run(capsys, "score", other, dataset, "--out", runs, *RUN, "--k-gallery", "5")
    assert code == cli.EXIT_ERROR and "corpus:" in errors(err)[0]
    code, out, _ = run(capsys, "score", other, dataset, "--out", runs, *RUN, "--k-gallery", "5", "--restart")
    assert code == 0 and json.loads(out)["scored"] == 7 and RunDir(runs).manifest()["corpus"] == str(other)


def test_the_corpus_remembers_its_weights(tmp_path, dataset, capsys, monkeypatch):
    weights = tmp_path / "w.pth"
    torch.manual_seed(3)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    store = tmp_path / "c.h5"
    feat = [a for a in FEAT if a not in ("--weights", "none")]
    assert run(capsys, "index", dataset, "--out", store, *feat, "--weights", weights)[0] == 0
    info = json.loads(run(capsys, "info", store)[1])
    assert info["weights_source"]["weights"] == str(weights)
    code, out, _ = run(capsys, "score", store, dataset, "--out", tmp_path / "r", *RUN, "--k-gallery", "5")
    assert code == 0 and json.loads(out)["scored"] == 7  # no --weights needed, no download tried
    weights.rename(tmp_path / "moved.pth")
    code, _, err = run(capsys, "score", store, dataset, "--out", tmp_path / "r2", *RUN)
    assert code == cli.EXIT_ERROR and "w.pth" in errors(err)[0] and "no such file" in errors(err)[0]
    code, _, err = run(capsys, "score", store, dataset, "--out", tmp_path / "r3", *RUN, "--weights", "none")
    assert code == cli.EXIT_ERROR and "differ from those the corpus was built with" in errors(err)[0]
    assert "leave --weights out" in errors(err)[0]


def _red(path: Path) -> float:
    """Mean red minus blue over the coloured part of an overlay (red = high scores)."""
    img = cv2.imread(str(path))[..., ::-1].astype(float)
    h = img.shape[0] // 3
    body = img[h: 2 * h, img.shape[1] // 4: img.shape[1] // 2]  # inside the crop, left of the colour bar
    return float((body[..., 0] - body[..., 2]).mean())


@pytest.mark.parametrize("calibrated", [False, True])
def test_overlays_share_one_scale_and_say_what_they_show(tmp_path, dataset, capsys, calibrated):
    store = tmp_path / "c.h5"
    train = tmp_path / "train"
    shutil.copytree(dataset / "train" / "good", train)
    held = tmp_path / "held"
    held.mkdir()
    for p in sorted(train.glob("*.png"))[::4]:
        p.rename(held / p.name)
    assert run(capsys, "index", train, "--out", store, *FEAT)[0] == 0
    if calibrated:
        assert run(capsys, "calibrate", store, held, *RUN, "--k-gallery", "5")[0] == 0
    runs = tmp_path / "run"
    assert run(capsys, "score", store, dataset, "--out", runs, *RUN, "--k-gallery", "5")[0] == 0
    rows = {r["folder"]: r for r in read_rows(runs / "scores.csv")}
    normal, defect = runs / rows["good"]["overlay"], runs / rows["defect"]["overlay"]
    assert normal.parent.name == "good" and defect.parent.name == "defect"  # the class shows
    assert _red(defect) > _red(normal)  # one scale: a normal image is not as red as a defect
    img = cv2.imread(str(normal))
    side = 96 * 4  # 96-px images are enlarged 4x (at least 320 px), a colour bar and a caption band added
    assert img.shape[1] == side + pictures.BAR_WIDTH and img.shape[0] > side
    caption = img[: img.shape[0] - side]
    assert (caption < 100).any()  # text drawn
    if calibrated:
        assert rows["good"]["is_anomalous"] in ("0", "1")


def test_progress_lines_when_stderr_is_not_a_terminal(corpus, dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    code, _, err = run(capsys, "score", corpus, dataset, "--out", tmp_path / "run", *RUN, "--k-gallery", "5",
                       "--batch-size", "2", "--no-overlays")
    lines = [ln for ln in err.splitlines() if ln.startswith("scoring:")]
    assert code == 0 and len(lines) >= 3, err
    assert "img/s" in lines[0] and "ETA" in lines[0] and lines[-1].startswith("scoring: 7/7 (100%)")


def test_bench_quick_writes_only_to_its_folder(tmp_path, capsys):
    def tracked_state():
        return subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    before = tracked_state()
    code = cli.main(["bench", "image_index", "--quick", "--out", str(tmp_path / "bench")])
    out, err = capsys.readouterr()
    assert code == 0 and (tmp_path / "bench" / "image_index.png").is_file()
    assert tracked_state() == before  # nothing in the repository was written
    temp = tmp_path / "temp"
    temp.mkdir()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(tempfile, "tempdir", str(temp))  # where a bench without --out puts its files
        code, _, err = run(capsys, "bench", "nope")
        assert code == cli.EXIT_ERROR and "unknown benchmark(s) ['nope']" in errors(err)[0]
        code, _, err = run(capsys, "bench", "compress", "only-one")
        assert code == cli.EXIT_ERROR and "needs CORPUS HELD_OUT" in errors(err)[0]
    assert list(temp.iterdir()) == []  # a refused request leaves no folder behind


def test_messages_say_what_to_do(tmp_path, corpus, dataset, capsys, monkeypatch):
    code, _, err = run(capsys, "info", tmp_path)
    assert code == cli.EXIT_ERROR and "is a folder; expected a corpus file" in errors(err)[0]
    code, _, err = run(capsys, "index", dataset, "--out", corpus, *FEAT, "--crop", "48")
    assert "crop: store has 64, requested 48" in errors(err)[0] and "leave these options out" in errors(err)[0]
    code, _, err = run(capsys, "score", corpus, dataset, "--out", tmp_path / "r", *RUN)  # k_gallery 50 > 12
    assert code == 0 and "spade-faiss: warning: k_gallery=50 > 12 images in the corpus: using 12" in err
    assert "UserWarning" not in err and ".py:" not in err

    def no_model(*a, **k):
        raise AssertionError("the model was built before the arguments were checked")
    monkeypatch.setattr(backbone.FeatureExtractor, "__init__", no_model)
    for bad in (["--k-image", "9", "--k-gallery", "3"], ["--batch-size", "0"], ["--stage2", "pruned", "--device",
                                                                                  "tpu"]):
        code, _, err = run(capsys, "score", corpus, dataset, "--out", tmp_path / "r4", *bad)
        assert code == cli.EXIT_ERROR and len(errors(err)) == 1, (bad, err)


def test_every_option_is_documented_and_verbose_goes_anywhere(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        formatter = p.formatter_class(prog=name)
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no description"
                if action.default not in (None, False, True, "==SUPPRESS=="):  # shown by the formatter
                    assert "%(default)s" in formatter._get_help_string(action), f"{name} {action.option_strings}"
                elif not action.required and action.default in ("==SUPPRESS==", None):  # said in words
                    assert "default" in action.help or action.dest in NO_DEFAULT, f"{name} {action.option_strings}"
    assert parser.parse_args(["score", "c.h5", "src", "--out", "o", "-v"]).verbose is True
    assert parser.parse_args(["-v", "info", "c.h5"]).verbose is True


def test_evaluate_plots_carry_their_areas(tmp_path, monkeypatch, capsys):
    labels = []
    real = pictures.curve_png

    def spy(path, curves, *args, **kwargs):
        labels.extend(curves)
        return real(path, curves, *args, **kwargs)
    monkeypatch.setattr(pictures, "curve_png", spy)
    root = make_dataset(tmp_path / "data" / "tile", n_train=10, n_good=3, n_defect=3, size=(64, 64), seed=1)
    assert run(capsys, "evaluate", root, "--out", tmp_path / "eval", *FEAT, "--k-gallery", "3")[0] == 0
    assert any(label.startswith("image (AUROC 0.") or label.startswith("image (AUROC 1.") for label in labels)
    assert any("AU-PRO" in label for label in labels)
    rows = read_rows(tmp_path / "eval" / "tile" / "scores.csv")
    assert len(rows) == 6 and all((tmp_path / "eval" / "tile" / r["overlay"]).is_file() for r in rows)
    assert (tmp_path / "eval" / "tile" / "report.html").is_file()


def test_bench_scripts_have_a_quick_mode_on_generated_data():
    for script, quick in cli.commands.BENCHES.values():
        text = (ROOT / "benchmarks" / script).read_text()
        assert "--out" in text, script
        for flag in quick:
            if flag.startswith("--"):
                assert flag in text, (script, flag)
