"""Discovery of image sets: folders, list files, and the MVTec AD layout (category and dataset
roots), and the frames of videos. Only paths here: nothing is decoded (a video is opened for its
frame count and rate only)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path

from .tiles import Tiling, list_tiles
from .video import VIDEO_SUFFIXES, Sampling, VideoError, is_video_name, list_frames, parse_ref

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_FOLDER = "ground_truth"
MASK_SUFFIX = "_mask"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One input of an image set: path, optional mask path, label (0 normal, 1 anomalous) and
    the defect class (the MVTec test folder) when known."""

    path: str
    mask: str | None = None
    label: int | None = None
    defect: str | None = None


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def is_mask_name(name: str) -> bool:
    return is_image_name(name) and Path(name).stem.lower().endswith(MASK_SUFFIX)


def list_folder(root: str | os.PathLike, videos: bool = False) -> list[str]:
    """Images (and, with ``videos``, video files) under ``root``, recursive, case-insensitive
    suffixes, hidden entries skipped, sorted."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder")
    if not root.is_dir():
        raise ValueError(f"{root}: expected a folder")
    found, seen_dirs, seen_files = [], set(), set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a link back into the tree (e.g. `loop -> .`): walked once already
            log.warning("%s: a link to %s, already walked: skipped", dirpath, real)
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            path = os.path.join(dirpath, f)
            wanted = is_image_name(f) or (videos and is_video_name(f))
            if wanted and os.path.realpath(path) not in seen_files:
                seen_files.add(os.path.realpath(path))  # each file once, whatever links lead to it
                found.append(path)
    return sorted(found)


def list_file(path: str | os.PathLike) -> list[str]:
    """Paths listed one per line in a text file (a UTF-8 byte-order mark, blank lines and ``#``
    comments skipped; an entry listed again is taken once, with a warning); relative paths are
    relative to the list's folder."""
    base = Path(path).parent
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")  # editors on Windows write one
    # Paths are bytes on POSIX: decode like os.listdir does, so any file name round-trips.
    lines = [os.fsdecode(ln) for ln in data.splitlines()]
    paths = [str(p if os.path.isabs(p) else base / p) for p in (ln.strip() for ln in lines)
             if p and not p.startswith("#")]
    unique = list(dict.fromkeys(paths))
    if len(unique) < len(paths):
        log.warning("%s: %d entries listed more than once: each is taken once", path, len(paths) - len(unique))
    return unique


def is_mvtec_category(root: str | os.PathLike) -> bool:
    return (Path(root) / "train" / "good").is_dir()


def mvtec_categories(root: str | os.PathLike) -> dict[str, Path]:
    """``{name: path}`` of the MVTec categories directly under a dataset root (sorted)."""
    root = Path(root)
    if not root.is_dir():
        return {}
    return {d.name: d for d in sorted(root.iterdir()) if not d.name.startswith(".") and is_mvtec_category(d)}


def source_kind(src: str | os.PathLike) -> str:
    """``image`` (one image file), ``video`` (one video file), ``list``, ``category`` (MVTec),
    ``dataset`` (a root of MVTec categories) or ``folder``."""
    src = Path(src)
    if src.is_file():
        return "image" if src.suffix.lower() in IMAGE_SUFFIXES else "video" if is_video_name(src.name) else "list"
    if is_mvtec_category(src):
        return "category"
    if mvtec_categories(src):
        return "dataset"
    return "folder"


def discover(src: str | os.PathLike, split: str = "train", sampling: Sampling | None = None,
             tiling: Tiling | None = None) -> list[Sample]:
    """Samples of ``src``: one image file, one video file, a list file (of images and videos),
    an MVTec category (``split`` ``train``: ``train/good``; ``test``: ``test/*`` with masks), or a
    folder of images and videos. A video contributes its frames sampled by ``sampling`` (every
    frame by default), each a sample whose path is a frame reference (``video.py``); with
    ``tiling``, an image contributes its tiles (``tiles.py``: tile references; a tile has no mask).

    A dataset root holding several MVTec categories is refused (one corpus per category), and
    so is a folder tree that holds ground-truth masks (``ground_truth/`` or ``*_mask.*``): masks
    are not images to index or score.

    Raises ``FileNotFoundError`` for a missing source and ``ValueError`` for one without images.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    kind = source_kind(src)
    if kind == "dataset":
        names = list(mvtec_categories(src))
        raise ValueError(f"{src} is an MVTec dataset root with categories {names}: give one category "
                         f"(e.g. {src / names[0]}), or run `spade-faiss evaluate {src}` for all of them")
    sampling = sampling or Sampling()
    if kind == "image":
        samples = [Sample(str(src))]
    elif kind == "video":
        samples = [Sample(f.path) for f in list_frames(str(src), sampling)]
    elif kind == "list":
        samples = [s for p in list_file(src) for s in _expand(p, sampling)]
    elif kind == "category":
        samples = mvtec_split(src, split)
    else:
        paths = list_folder(src, videos=True)
        _refuse_masks(src, [p for p in paths if not is_video_name(p)])
        samples = [s for p in paths for s in _expand(p, sampling)]
    if not samples:
        raise ValueError(f"{src}: no images found (looked for {', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)})")
    if tiling is not None and tiling.size is not None:
        samples = [t for s in samples for t in _tiled(s, tiling)]
    return samples


def _tiled(sample: Sample, tiling: Tiling) -> list[Sample]:
    """An image sample as its tiles (a frame, or a file whose size cannot be read, stays whole:
    it is refused by name when decoded, like any broken image)."""
    if parse_ref(sample.path) is not None:
        return [sample]
    try:
        refs = list_tiles(sample.path, tiling)
    except (ValueError, OSError) as e:
        log.warning("%s", e)
        return [sample]
    return [dataclasses.replace(sample, path=t.path, mask=None) for t in refs]


def _expand(path: str, sampling: Sampling) -> list[Sample]:
    """One listed path as samples: an image, or a video's sampled frames (a video that cannot be
    read is one sample, refused by name when it is decoded, like a broken image)."""
    if not is_video_name(path):
        return [Sample(path)]
    try:
        return [Sample(f.path) for f in list_frames(path, sampling)]
    except (VideoError, FileNotFoundError) as e:
        log.warning("%s", e)
        return [Sample(path)]


def hold_out(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(kept, held out): each sample held out when a seeded hash of its path falls below
    ``fraction``: about that fraction, spread over the whole set (not the last files of one
    session), the same choice for an image whatever else the set holds (a set that grows keeps
    its held-out images held out)."""
    def draw(path: str) -> float:
        digest = hashlib.sha256(f"{seed}:{os.path.abspath(path)}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    held = [draw(s.path) < fraction for s in samples]
    return [s for s, h in zip(samples, held) if not h], [s for s, h in zip(samples, held) if h]


def _refuse_masks(src: Path, paths: list[str]) -> None:
    masks = [p for p in paths if is_mask_name(os.path.basename(p)) or MASK_FOLDER in Path(p).relative_to(src).parts]
    if masks:
        raise ValueError(f"{src}: {len(masks)} of its {len(paths)} images look like ground-truth masks "
                         f"(e.g. {masks[0]}); give the folder of images only (for an MVTec layout: "
                         f"the category folder, which holds train/good)")


def mvtec_split(root: str | os.PathLike, split: str) -> list[Sample]:
    """``train``: ``train/good``; ``test``: ``test/<defect>`` with masks from ``ground_truth``."""
    root = Path(root)
    if split == "train":
        return [Sample(p, None, 0, "good") for p in list_folder(root / "train" / "good")]
    samples = []
    test = root / "test"
    if not test.is_dir():
        raise FileNotFoundError(f"{test}: the MVTec category has no test/ folder")
    for defect in sorted(d.name for d in test.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for p in list_folder(test / defect):
            if defect == "good":
                samples.append(Sample(p, None, 0, defect))
                continue
            mask = root / MASK_FOLDER / defect / (Path(p).stem + MASK_SUFFIX + ".png")
            samples.append(Sample(p, str(mask) if mask.exists() else None, 1, defect))
    return samples
