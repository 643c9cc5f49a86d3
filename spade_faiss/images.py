"""Decoding, preprocessing and masks (SPEC 1.1), and discovery of image sets.

Everything here is a plain function of bytes or paths: no model, no store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# Decompression-bomb guard: a larger decoded image is refused before it is resized.
MAX_PIXELS = 256_000_000


class ImageError(ValueError):
    """An input that is not a usable image; the message names the file and the reason."""


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    """One decoded input: its path as given, content hash, RGB uint8 pixels."""

    path: str
    sha256: str
    rgb: np.ndarray  # (H, W, 3) uint8

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the original image."""
        return self.rgb.shape[0], self.rgb.shape[1]


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes, with a clear error when it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode with ``cv2.imread(IMREAD_COLOR)`` semantics and return RGB uint8 (H, W, 3).

    IMREAD_COLOR gives 8-bit 3-channel output: grayscale is expanded, alpha dropped, 16-bit
    scaled to 8-bit. Truncated PNG/JPEG files are refused instead of returning the partial
    picture that libjpeg would produce with only a warning.
    """
    if not data:
        raise ImageError(f"{name}: empty file")
    _check_complete(data, name)
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as e:  # e.g. a header claiming more pixels than OpenCV accepts (a bomb)
        reason = [ln for ln in str(e).splitlines() if ln.strip()][-1].strip()
        raise ImageError(f"{name}: cannot decode ({reason})") from None
    if bgr is None:
        raise ImageError(f"{name}: not a decodable image")
    if bgr.shape[0] * bgr.shape[1] > MAX_PIXELS:
        raise ImageError(f"{name}: {bgr.shape[1]}x{bgr.shape[0]} exceeds {MAX_PIXELS} pixels")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _check_complete(data: bytes, name: str) -> None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-64:]:
        raise ImageError(f"{name}: truncated PNG (no IEND chunk)")
    # A JPEG ends with the EOI marker; some writers append padding after it, so look near the end.
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-4096:]:
        raise ImageError(f"{name}: truncated JPEG (no end-of-image marker)")


def printable(path: str) -> str:
    """A path as text that any UTF-8 writer accepts (undecodable bytes as backslash escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def load_image(path: str | os.PathLike) -> LoadedImage:
    """Read, hash and decode one file (the bytes are read once for both)."""
    data = read_bytes(path)
    return LoadedImage(str(path), sha256_bytes(data), decode(data, str(path)))


def resize_crop(img: np.ndarray, resize: int, crop: int, interpolation: int) -> np.ndarray:
    """Square resize (aspect ratio not kept, MVTec convention) then centre crop."""
    out = cv2.resize(img, (resize, resize), interpolation=interpolation)
    o = (resize - crop) // 2
    return out[o:o + crop, o:o + crop]


def preprocess(rgb: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> normalised float32 (3, crop, crop), SPEC 1.1."""
    x = resize_crop(rgb, resize, crop, cv2.INTER_AREA).astype(np.float32) / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def crop_view(rgb: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
    """The RGB uint8 pixels the model sees (before normalisation), for pictures."""
    return resize_crop(rgb, resize, crop, cv2.INTER_AREA)


def load_mask(path: str | os.PathLike | None, image_size: tuple[int, int],
              resize: int = 256, crop: int = 224) -> np.ndarray:
    """Ground-truth mask as bool (crop, crop); ``None`` means an all-normal mask.

    ``image_size`` is the (height, width) of the image the mask belongs to; a mask of another
    size is an error, not something to guess about.
    """
    if path is None:
        return np.zeros((crop, crop), dtype=bool)
    m = cv2.imdecode(np.frombuffer(read_bytes(path), np.uint8), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise ImageError(f"{path}: not a decodable mask")
    if m.shape != tuple(image_size):
        raise ImageError(f"{path}: mask is {m.shape[1]}x{m.shape[0]}, "
                         f"image is {image_size[1]}x{image_size[0]}")
    return resize_crop(m, resize, crop, cv2.INTER_NEAREST) > 127


# --- discovery -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sample:
    """One input of an image set: path, optional mask path, label (0 normal, 1 anomalous)."""

    path: str
    mask: str | None = None
    label: int | None = None
    defect: str | None = None


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def list_folder(root: str | os.PathLike) -> list[str]:
    """Images under ``root``, recursive, case-insensitive suffixes, hidden entries skipped, sorted."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder")
    if not root.is_dir():
        raise ValueError(f"{root}: expected a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in filenames if is_image_name(f)]
    return sorted(found)


def list_file(path: str | os.PathLike) -> list[str]:
    """Paths listed one per line in a text file (blank lines and ``#`` comments skipped);
    relative paths are relative to the list's folder."""
    base = Path(path).parent
    # Paths are bytes on POSIX: decode like os.listdir does, so any file name round-trips.
    lines = [os.fsdecode(ln) for ln in Path(path).read_bytes().splitlines()]
    return [str(p if os.path.isabs(p) else base / p)
            for p in (ln.strip() for ln in lines) if p and not p.startswith("#")]


def is_mvtec_category(root: str | os.PathLike) -> bool:
    return (Path(root) / "train" / "good").is_dir()


def discover(src: str | os.PathLike, split: str = "train") -> list[Sample]:
    """Samples of ``src``: an MVTec category (``split`` train or test), a folder, or a list file.

    Raises ``FileNotFoundError`` for a missing source and ``ValueError`` for one without images.
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    if src.is_file():
        samples = [Sample(p) for p in list_file(src)]
    elif is_mvtec_category(src):
        samples = mvtec_split(src, split)
    else:
        samples = [Sample(p) for p in list_folder(src)]
    if not samples:
        raise ValueError(f"{src}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return samples


def mvtec_split(root: str | os.PathLike, split: str) -> list[Sample]:
    """``train``: ``train/good``; ``test``: ``test/<defect>`` with masks from ``ground_truth``."""
    root = Path(root)
    if split == "train":
        return [Sample(p, None, 0, "good") for p in list_folder(root / "train" / "good")]
    if split != "test":
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    samples = []
    test = root / "test"
    for defect in sorted(d.name for d in test.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for p in list_folder(test / defect):
            if defect == "good":
                samples.append(Sample(p, None, 0, defect))
                continue
            mask = root / "ground_truth" / defect / (Path(p).stem + "_mask.png")
            samples.append(Sample(p, str(mask) if mask.exists() else None, 1, defect))
    return samples


# --- batches with decoding overlapped ----------------------------------------------------

@dataclasses.dataclass
class Prepared:
    """A sample ready for the backbone, or the reason it is not."""

    sample: Sample
    image: LoadedImage | None = None
    tensor: np.ndarray | None = None  # float32 (3, crop, crop)
    error: str | None = None


def prepare(sample: Sample | str | np.ndarray, resize: int, crop: int) -> Prepared:
    """Load (path) or take (RGB uint8 array) one input and preprocess it; errors are caught
    and returned as text so that one bad input never stops a batch."""
    if isinstance(sample, np.ndarray):
        rgb = _as_rgb(sample)
        img = LoadedImage("<array>", sha256_bytes(rgb.tobytes()), rgb)
        return Prepared(Sample("<array>"), img, preprocess(rgb, resize, crop))
    sample = sample if isinstance(sample, Sample) else Sample(str(sample))
    try:
        sample.path.encode("utf-8")
    except UnicodeEncodeError:  # the store and the CSVs keep paths as UTF-8 text
        return Prepared(sample, error=f"{printable(sample.path)}: file name is not valid UTF-8")
    try:
        img = load_image(sample.path)
    except (ImageError, FileNotFoundError) as e:
        return Prepared(sample, error=str(e) if str(e).startswith(sample.path) else f"{sample.path}: {e}")
    return Prepared(sample, img, preprocess(img.rgb, resize, crop))


def header_pixels(data: bytes) -> int | None:
    """Width x height from the file header without decoding (None when PIL cannot tell), so a
    service can refuse decompression bombs before allocating them."""
    import io
    import warnings

    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return int(im.size[0]) * int(im.size[1])
    except Image.DecompressionBombError:  # PIL refuses above twice its own limit: a lower bound
        return 2 * int(Image.MAX_IMAGE_PIXELS) + 1
    except Exception:  # unknown or broken headers are left to the decoder's own error
        return None


def prepare_bytes(data: bytes, name: str, resize: int, crop: int) -> Prepared:
    """Like :func:`prepare` for an in-memory file (an upload); errors are returned as text."""
    try:
        img = LoadedImage(name, sha256_bytes(data), decode(data, name))
    except ImageError as e:
        return Prepared(Sample(name), error=str(e))
    return Prepared(Sample(name), img, preprocess(img.rgb, resize, crop))


def _as_rgb(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise ValueError(f"expected an RGB uint8 array (H, W, 3) or (H, W), got {a.dtype} {a.shape}")
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a


def iter_prepared(samples, batch_size: int, resize: int, crop: int, workers: int = 2):
    """Yield lists of :class:`Prepared` of up to ``batch_size`` inputs, in order.

    Decoding runs in ``workers`` threads (OpenCV releases the GIL) up to two batches ahead of
    the consumer, so the backbone does not wait on disk.
    """
    from concurrent.futures import ThreadPoolExecutor

    samples = list(samples)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(prepare, s, resize, crop) for s in samples[: 2 * batch_size]]
        nxt = len(futures)
        for start in range(0, len(samples), batch_size):
            batch = [f.result() for f in futures[start:start + batch_size]]
            for s in samples[nxt: nxt + batch_size]:
                futures.append(pool.submit(prepare, s, resize, crop))
            nxt = min(len(samples), nxt + batch_size)
            for i in range(start, start + batch_size):  # drop finished work: bounded memory
                if i < len(futures):
                    futures[i] = None
            yield batch
