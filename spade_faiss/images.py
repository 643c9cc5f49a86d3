"""Decoding, preprocessing and masks (docs/design.md §1), and batches of inputs decoded ahead.

Everything here is a plain function of bytes, paths or pixels: no model, no store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import stat
import threading

import cv2
import numpy as np

from . import tiles, video
from .config import DEFAULTS

MAX_FILE_BYTES = 1 << 30  # an image file larger than this is refused before it is read
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


def read_bytes(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The file's bytes, with a clear error when it is missing, unreadable, not a regular file
    (a FIFO would block forever, ``/dev/zero`` never ends) or larger than ``max_bytes``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{path}: not a regular file ({_file_kind(info.st_mode)}); only files are read")
        raise ImageError(f"{path}: {info.st_size} bytes, more than the {max_bytes} an image may have")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > max_bytes:  # it grew while read
        raise ImageError(f"{path}: more than the {max_bytes} bytes an image may have")
    return data


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode with ``cv2.imread(IMREAD_COLOR)`` semantics and return RGB uint8 (H, W, 3).

    IMREAD_COLOR gives 8-bit 3-channel output: grayscale is expanded, alpha dropped, 16-bit
    scaled to 8-bit. Truncated PNG/JPEG files and JPEGs with damaged scan data are refused
    instead of returning the partial or guessed picture that libjpeg produces with only a
    warning.
    """
    if not data:
        raise ImageError(f"{name}: empty file")
    _check_complete(data, name)
    pixels = header_pixels(data)
    if pixels is not None and pixels > MAX_PIXELS:
        raise ImageError(f"{name}: {pixels} pixels exceed the limit of {MAX_PIXELS} (a decompression bomb?)")
    if data[:2] == b"\xff\xd8":
        _check_jpeg_scan(data, name)
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
    """Refuse a PNG or JPEG cut short (decoders fill the missing part silently). Bytes after the
    end are allowed: motion-photo trailers, padding, appended metadata."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and not _png_has_end(data):
        raise ImageError(f"{name}: truncated PNG (no IEND chunk)")
    if data[:2] == b"\xff\xd8" and not _jpeg_has_end(data):
        raise ImageError(f"{name}: truncated JPEG (no end-of-image marker after the image data)")


# libjpeg's warnings that mean damaged image data (jerror.h), as against benign ones such as
# "unknown JFIF revision number" or an unknown Adobe transform code.
JPEG_DAMAGE = ("Corrupt JPEG data", "Premature end of JPEG file")


def _check_jpeg_scan(data: bytes, name: str) -> None:
    """Refuse a JPEG whose entropy-coded data is damaged. libjpeg decodes one with a warning on
    stderr only ("Corrupt JPEG data: ..."), guessing the damaged blocks, and OpenCV, PIL and
    torchvision all return that picture. simplejpeg's strict mode raises libjpeg-turbo's first
    warning instead; the check decodes at 1/8 scale in gray (every coefficient is still
    entropy-decoded, about 2 ms for 900x900). A benign first warning, or a file that simplejpeg
    cannot decode even leniently (a variant it does not support), is left to OpenCV, whose
    decode is the one used."""
    import simplejpeg
    scaled = dict(colorspace="gray", min_factor=8, min_height=1, min_width=1)
    try:
        simplejpeg.decode_jpeg(data, strict=True, **scaled)
    except ValueError as strict:
        if not str(strict).startswith(JPEG_DAMAGE):
            return
        try:
            simplejpeg.decode_jpeg(data, strict=False, **scaled)
        except ValueError:
            return
        raise ImageError(f"{name}: damaged JPEG data ({strict})") from None


def _png_has_end(data: bytes) -> bool:
    """Walk the chunks (length, type, data, CRC) from the signature to IEND."""
    pos = 8
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind == b"IEND":
            return True
        if not kind.isalpha():  # a damaged structure, not a short file: the decoder refuses it
            return b"IEND" in data[pos:]
        pos += 12 + length
    return False


def _jpeg_has_end(data: bytes) -> bool:
    """An EOI marker after the first start-of-scan (an EXIF thumbnail's EOI comes before it)."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xDA:  # start of scan: entropy-coded data follows, up to EOI
            return data.find(b"\xff\xd9", pos + 2) >= 0
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # fill byte, markers without length
            pos += 1 if marker == 0xFF else 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return data.find(b"\xff\xd9", 2) >= 0  # an unusual layout: the old rule


def printable(path: str) -> str:
    """A path as text that any UTF-8 writer accepts (undecodable bytes as backslash escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class _LastDecoded:
    """The last image decoded for its tiles: tiles of one image arrive together, so each image
    is read and decoded once (one image held at a time; a changed file is read again)."""

    def __init__(self):
        self.lock, self.key, self.rgb = threading.Lock(), None, None

    def get(self, path: str) -> np.ndarray:
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)
        with self.lock:  # decoding threads asking for tiles of one image wait for one decode
            if key != self.key:
                self.key, self.rgb = None, None
                self.rgb, self.key = decode(read_bytes(path), path), key
            return self.rgb


_last_decoded = _LastDecoded()


def _load_tile(ref: tiles.TileRef) -> LoadedImage:
    rgb = _last_decoded.get(ref.image)
    h, w = rgb.shape[:2]
    if ref.x + ref.w > w or ref.y + ref.h > h:
        raise ImageError(f"{ref.path}: the tile lies outside the image ({w}x{h}; has the file changed?)")
    piece = np.ascontiguousarray(rgb[ref.y:ref.y + ref.h, ref.x:ref.x + ref.w])
    return LoadedImage(ref.path, sha256_bytes(piece.tobytes()), piece)


def load_image(path: str | os.PathLike) -> LoadedImage:
    """Read, hash and decode one file (the bytes are read once for both), one frame of a video
    (a frame reference, ``video.py``) or one tile of an image (a tile reference, ``tiles.py``);
    frames and tiles are hashed over their decoded pixels."""
    tile = tiles.parse_ref(str(path))
    if tile is not None:
        return _load_tile(tile)
    ref = video.parse_ref(str(path))
    if ref is None:
        data = read_bytes(path)
        return LoadedImage(str(path), sha256_bytes(data), decode(data, str(path)))
    try:
        rgb = video.read_frame(ref)
    except video.VideoError as e:
        raise ImageError(str(e)) from None
    if rgb.shape[0] * rgb.shape[1] > MAX_PIXELS:
        raise ImageError(f"{path}: {rgb.shape[1]}x{rgb.shape[0]} exceeds {MAX_PIXELS} pixels")
    return LoadedImage(str(path), sha256_bytes(rgb.tobytes()), rgb)


def content_sha256(path: str) -> str:
    """The content hash :func:`load_image` gives ``path`` (a file's bytes, a frame's pixels)."""
    return load_image(path).sha256 if video.parse_ref(path) or tiles.parse_ref(path) else \
        sha256_bytes(read_bytes(path))


def resize_crop(img: np.ndarray, resize: int, crop: int, interpolation: int) -> np.ndarray:
    """Square resize (aspect ratio not kept, MVTec convention) then centre crop."""
    out = cv2.resize(img, (resize, resize), interpolation=interpolation)
    o = (resize - crop) // 2
    return out[o:o + crop, o:o + crop]


def preprocess(rgb: np.ndarray, resize: int = DEFAULTS["resize"], crop: int = DEFAULTS["crop"]) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> normalised float32 (3, crop, crop), docs/design.md §1."""
    x = resize_crop(rgb, resize, crop, cv2.INTER_AREA).astype(np.float32) / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def crop_view(rgb: np.ndarray, resize: int = DEFAULTS["resize"], crop: int = DEFAULTS["crop"]) -> np.ndarray:
    """The RGB uint8 pixels the model sees (before normalisation), for pictures."""
    return resize_crop(rgb, resize, crop, cv2.INTER_AREA)


def load_mask(path: str | os.PathLike | None, image_size: tuple[int, int],
              resize: int = DEFAULTS["resize"], crop: int = DEFAULTS["crop"]) -> np.ndarray:
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


# --- inputs prepared for the backbone, decoded ahead ---------------------------------------

@dataclasses.dataclass
class Prepared:
    """An input ready for the backbone, or the reason it is not.

    ``sample`` is what the caller gave (a :class:`~spade_faiss.datasets.Sample`, a path, an
    array or a :class:`LoadedImage`), kept so that results can carry labels and masks.
    """

    sample: object
    path: str
    image: LoadedImage | None = None
    tensor: np.ndarray | None = None  # float32 (3, crop, crop)
    error: str | None = None


def prepare(item, resize: int, crop: int) -> Prepared:
    """Load a path (str, PathLike or anything with a ``path`` attribute such as a dataset
    Sample), or take an RGB uint8 array or a :class:`LoadedImage`, and preprocess it. Decoding
    errors are returned as text so that one bad input never stops a batch; an array of the
    wrong type is a programming error and raises ``ValueError``."""
    if isinstance(item, LoadedImage):
        return Prepared(item, item.path, item, preprocess(item.rgb, resize, crop))
    if isinstance(item, np.ndarray):
        rgb = _as_rgb(item)
        img = LoadedImage("<array>", sha256_bytes(rgb.tobytes()), rgb)
        return Prepared(item, img.path, img, preprocess(rgb, resize, crop))
    path = str(getattr(item, "path", item))
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # the store and the CSVs keep paths as UTF-8 text
        return Prepared(item, path, error=f"{printable(path)}: file name is not valid UTF-8")
    try:
        img = load_image(path)
    except (ImageError, FileNotFoundError) as e:
        return Prepared(item, path, error=str(e) if str(e).startswith(path) else f"{path}: {e}")
    return Prepared(item, path, img, preprocess(img.rgb, resize, crop))


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
    except Image.DecompressionBombError as e:  # PIL refuses above twice its own limit; it says the size
        said = re.search(r"\((\d+) pixels\)", str(e))
        return int(said.group(1)) if said else 2 * int(Image.MAX_IMAGE_PIXELS) + 1
    except Exception:  # unknown or broken headers are left to the decoder's own error
        return None


def load_bytes(data: bytes, name: str) -> LoadedImage:
    """An in-memory file (an upload) decoded like :func:`load_image`; raises ``ImageError``."""
    return LoadedImage(name, sha256_bytes(data), decode(data, name))


def _as_rgb(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise ValueError(f"expected an RGB uint8 array (H, W, 3) or (H, W), got {a.dtype} {a.shape}")
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a


def iter_prepared(items, batch_size: int, resize: int, crop: int, workers: int = DEFAULTS["workers"]):
    """Yield lists of :class:`Prepared` of up to ``batch_size`` inputs, in input order.

    Decoding runs in ``workers`` threads (OpenCV releases the GIL) up to two batches ahead of
    the consumer, so the backbone does not wait on disk; ``items`` may be any iterable (it is
    consumed as the batches are taken, so memory stays bounded).
    """
    import collections
    import itertools
    from concurrent.futures import ThreadPoolExecutor

    items = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        ahead = collections.deque(pool.submit(prepare, s, resize, crop)
                                  for s in itertools.islice(items, 2 * batch_size))
        while ahead:
            batch = [ahead.popleft().result() for _ in range(min(batch_size, len(ahead)))]
            ahead.extend(pool.submit(prepare, s, resize, crop) for s in itertools.islice(items, batch_size))
            yield batch
