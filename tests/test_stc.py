"""The ShanghaiTech Campus protocol (issue 37) on a small generated scene in the STC layout:
textures drifting across the frames, objects pasted into some test frames with exact pixel
masks. The protocol's choices (training frames taken evenly, every 5th test frame, K=1, 256x256)
and its two pooled ROCAUCs are recomputed here from the run's own files."""

import json

import cv2
import h5py
import numpy as np

from spade_faiss import metrics
from spade_faiss.apps import cli
from spade_faiss.apps.runs import RunDir, read_rows
from spade_faiss.synthetic import paste_defect

from .conftest import RUN
from .test_video import scene, write_video

SIZE = (72, 96)  # frames (H, W): not square, not 256: the protocol resizes


def make_stc(root, seed=0):
    (root / "training" / "videos").mkdir(parents=True)
    for k in range(2):
        write_video(root / "training" / "videos" / f"01_{k:03d}.avi", scene(seed + k, 25, SIZE))
    frames_dir = root / "testing" / "frames"
    for d in ("test_frame_mask", "test_pixel_mask"):
        (root / "testing" / d).mkdir(parents=True)
    rng = np.random.default_rng(seed + 7)
    for v in range(2):
        name = f"01_{v:04d}"
        (frames_dir / name).mkdir(parents=True)
        frames = scene(seed + 10 + v, 30, SIZE)
        labels = np.zeros(30, np.uint8)
        pixels = np.zeros((30, *SIZE), np.uint8)
        for i in range(30):
            if i >= 15:  # an object walks in
                frames[i], mask = paste_defect(rng, frames[i])
                labels[i], pixels[i] = 1, mask > 0
            cv2.imwrite(str(frames_dir / name / f"{i:03d}.png"), cv2.cvtColor(frames[i], cv2.COLOR_RGB2BGR))
        np.save(root / "testing" / "test_frame_mask" / f"{name}.npy", labels)
        np.save(root / "testing" / "test_pixel_mask" / f"{name}.npy", pixels)


def test_the_stc_protocol_on_a_generated_scene(tmp_path, capsys):
    root = tmp_path / "stc"
    make_stc(root)
    out = tmp_path / "out"
    code = cli.main(["evaluate", "--protocol", "stc", str(root), "--out", str(out), "--train-frames", "20",
                     "--backbone", "resnet18", "--weights", "none", *RUN])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "| SPADE (paper) | 71.9 | 89.9 |" in printed
    report = json.loads(RunDir(out).metrics.read_text())
    assert (report["resize"], report["crop"], report["k_gallery"], report["k_image"]) == (256, 256, 1, 1)
    assert report["train_frames"] == 20 and report["test_frames"] == 12 and report["anomalous_frames"] == 6
    # the corpus: 20 of the 50 training frames, taken evenly (every 2nd) over both videos
    from spade_faiss import FeatureStore, video
    with FeatureStore.open(out / "stc.h5") as store:
        refs = [video.parse_ref(p) for p in store.paths()]
        assert [(r.video.endswith("01_000.avi"), r.frame) for r in refs] == \
            [(True, f) for f in range(0, 25, 2)] + [(False, f) for f in range(1, 14, 2)]
        assert store.config.resize == store.config.crop == 256
    # both ROCAUCs, recomputed from the run's files and the dataset's masks
    rows = read_rows(out / "run" / "scores.csv")
    with h5py.File(out / "run" / "maps.h5") as h:
        maps = dict(zip([p.decode() for p in h["path"][:]], h["maps"][:]))
    labels, scores, masks, pixel_maps = [], [], [], []
    for r in rows:
        video_name, frame = r["image_path"].split("/")[-2], int(r["image_path"].split("/")[-1][:3])
        assert frame % 5 == 0  # every 5th test frame
        labels.append(np.load(root / "testing" / "test_frame_mask" / f"{video_name}.npy")[frame])
        scores.append(float(r["score"]))
        mask = np.load(root / "testing" / "test_pixel_mask" / f"{video_name}.npy")[frame]
        masks.append(cv2.resize(mask, (256, 256), interpolation=cv2.INTER_NEAREST) > 0)
        pixel_maps.append(maps[r["image_path"]])
    assert len(rows) == 12
    assert report["frame_AUROC"] == metrics.auroc(np.array(labels, bool), np.array(scores, np.float32))
    assert report["pixel_AUROC"] == metrics.pixel_auroc(np.stack(masks), np.stack(pixel_maps))
    assert report["frame_AUROC"] > 0.5 and report["pixel_AUROC"] > 0.5  # the objects stand out


def test_a_root_that_is_not_stc_is_refused_by_name(tmp_path, capsys):
    code = cli.main(["evaluate", "--protocol", "stc", str(tmp_path), "--out", str(tmp_path / "o"), *RUN])
    assert code == cli.EXIT_ERROR and "training/videos" in capsys.readouterr().err
