"""Videos as sources: each sampled frame of a video is one item, addressed by a *frame
reference* ``<video path>#frame=<index>&t=<seconds>`` (docs/design.md, "Videos").

The reference is the item's path everywhere a path is kept (the corpus's ``images/path``,
``scores.csv``, ``maps.h5``, the report, the service's neighbours): it names the video, the
frame index (0-based, in decoding order) and its timestamp (index / the container's frame rate).
A frame's content hash is the sha256 of its decoded RGB pixels (dedupe and provenance, like an
image file's bytes).

Listing (:func:`list_frames`) takes the container's frame count and rate (OpenCV's FFmpeg
backend); a video that does not declare its count is read through once to count it. Reading
(:func:`read_frame`) keeps one decoder per video open and reads forward, so frames asked for in
order (a batch job, a resumed run continuing after its last committed frame) are decoded once;
asking for an earlier frame reopens the video. A frame past what the file holds (a truncated
or damaged video) is an error naming the frame and where the video ends: the frames before it
are kept.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import threading

import cv2
import numpy as np

from .config import DEFAULTS, check_values

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".ts")
_REF = re.compile(r"^(?P<video>.+)#frame=(?P<frame>\d+)(?:&t=(?P<t>[0-9]+(?:\.[0-9]+)?))?$", re.S)
OPEN_READERS = 8  # decoders kept open at once (least recently used closed first)


class VideoError(ValueError):
    """A video or a frame that cannot be read; the message names it and the reason."""


def is_video_name(name: str) -> bool:
    return not os.path.basename(name).startswith(".") and name.lower().endswith(VIDEO_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class FrameRef:
    video: str
    frame: int
    time_s: float | None = None

    @property
    def path(self) -> str:
        t = "" if self.time_s is None else f"&t={self.time_s:.3f}"
        return f"{self.video}#frame={self.frame}{t}"

    @property
    def stem(self) -> str:
        """A file-name stem for pictures of this frame: ``<video stem>_f<index>`` (a camera's
        ``camera<index>_f<index>``)."""
        name = f"camera{self.video}" if self.video.isdigit() else \
            os.path.splitext(os.path.basename(self.video.rstrip("/")))[0]
        return f"{re.sub(r'[^A-Za-z0-9._-]', '_', name) or 'stream'}_f{self.frame:06d}"


def is_live_source(source: str) -> bool:
    """A camera's index (``0``) or a stream's URL (``rtsp://...``, ``http://...``): what
    ``watch`` reads (``live.py``) besides video files and folders."""
    return source.isdigit() or bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source))


def parse_ref(path: str) -> FrameRef | None:
    """The frame a path refers to (of a video file, a camera or a stream), or None for a plain
    file path."""
    m = _REF.match(str(path))
    if m is None or not (is_video_name(m.group("video")) or is_live_source(m.group("video"))):
        return None
    t = m.group("t")
    return FrameRef(m.group("video"), int(m.group("frame")), None if t is None else float(t))


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Which frames of a video are items: every ``stride``-th frame from ``start_s`` (inclusive)
    to ``end_s`` (exclusive, None: the end), counted from the first frame in that range."""

    stride: int = DEFAULTS["frame_stride"]
    start_s: float = DEFAULTS["start_s"]
    end_s: float | None = DEFAULTS["end_s"]

    def __post_init__(self):
        check_values({"frame_stride": self.stride, "start_s": self.start_s, "end_s": self.end_s})
        if self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError(f"end_s={self.end_s!r}: expected a time after start_s={self.start_s!r}")


def _open(video: str) -> cv2.VideoCapture:
    if not os.path.isfile(video):
        raise FileNotFoundError(f"{video}: no such video file")
    cap = cv2.VideoCapture(video, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        raise VideoError(f"{video}: not a readable video (OpenCV's FFmpeg backend cannot open it)")
    return cap


def list_frames(video: str, sampling: Sampling = Sampling()) -> list[FrameRef]:
    """The sampled frames of ``video`` (``FrameRef`` in order); raises ``VideoError`` for a file
    that is not a readable video, or one whose time range holds no frame."""
    video = str(video)
    cap = _open(video)
    try:
        fps = cap.get(cv2.CAP_PROP_FPS)
        fps = fps if math.isfinite(fps) and fps > 0 else None
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if count <= 0:  # not declared: count by reading through
            while cap.grab():
                count += 1
    finally:
        cap.release()
    if fps is None and (sampling.start_s or sampling.end_s is not None):
        raise VideoError(f"{video}: declares no frame rate, so start/end times cannot be placed")
    first = 0 if fps is None else math.ceil(sampling.start_s * fps - 1e-9)
    last = count if fps is None or sampling.end_s is None else min(count, math.ceil(sampling.end_s * fps - 1e-9))
    frames = [FrameRef(video, i, None if fps is None else round(i / fps, 3))
              for i in range(first, last, sampling.stride)]
    if not frames:
        raise VideoError(f"{video}: no frame in the time range ({count} frames"
                         f"{'' if fps is None else f' at {fps:g} fps'})")
    return frames


class _Reader:
    def __init__(self, video: str):
        self.video, self.lock, self.cap, self.next = video, threading.Lock(), None, 0

    def read(self, frame: int) -> np.ndarray:
        if self.cap is None or frame < self.next:
            self.close()
            self.cap, self.next = _open(self.video), 0
        while self.next < frame:
            if not self.cap.grab():
                raise VideoError(f"{self.video}#frame={frame}: not readable (the video ends, or is damaged, at "
                                 f"frame {self.next})")
            self.next += 1
        ok, bgr = self.cap.read()
        if not ok or bgr is None:
            raise VideoError(f"{self.video}#frame={frame}: not readable (the video ends, or is damaged, at "
                             f"frame {frame})")
        self.next += 1
        return bgr

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


_readers: collections.OrderedDict[str, _Reader] = collections.OrderedDict()
_readers_lock = threading.Lock()


def read_frame(ref: FrameRef) -> np.ndarray:
    """The RGB uint8 pixels (H, W, 3) of one frame (module doc: decoders read forward)."""
    with _readers_lock:
        reader = _readers.pop(ref.video, None) or _Reader(ref.video)
        _readers[ref.video] = reader
        while len(_readers) > OPEN_READERS:
            _, old = _readers.popitem(last=False)
            with old.lock:
                old.close()
    with reader.lock:
        bgr = reader.read(ref.frame)
    if bgr.ndim == 2:
        return cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def is_video_bytes(data: bytes) -> bool:
    """Whether uploaded bytes start like a video container (MP4/MOV, AVI, Matroska/WebM, MPEG)."""
    return (data[4:8] == b"ftyp" or (data[:4] == b"RIFF" and data[8:12] == b"AVI ")
            or data[:4] == b"\x1a\x45\xdf\xa3" or data[:4] == b"\x00\x00\x01\xba"
            or (len(data) > 376 and data[0] == 0x47 and data[188] == 0x47 and data[376] == 0x47))


def clip_frames(data: bytes, name: str, max_pixels: int, max_frames: int) -> list[tuple[FrameRef, np.ndarray]]:
    """Every frame of an uploaded clip, in order, as (reference ``name#frame=N&t=S``, RGB);
    ``VideoError`` for a clip that cannot be read, with more than ``max_frames`` frames, or with
    frames over ``max_pixels``."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="spade-clip-") as folder:
        path = os.path.join(folder, "clip")
        with open(path, "wb") as f:
            f.write(data)
        cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
        try:
            if not cap.isOpened():
                raise VideoError(f"{name}: not a readable video clip")
            fps = cap.get(cv2.CAP_PROP_FPS)
            fps = fps if math.isfinite(fps) and fps > 0 else None
            out = []
            while True:
                ok, bgr = cap.read()
                if not ok or bgr is None:
                    break
                if len(out) == max_frames:
                    raise VideoError(f"{name}: a clip of more than {max_frames} frames (send a shorter one)")
                if bgr.shape[0] * bgr.shape[1] > max_pixels:
                    raise VideoError(f"{name}: frames of {bgr.shape[1]}x{bgr.shape[0]}, more than {max_pixels} pixels")
                i = len(out)
                rgb = cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB if bgr.ndim == 2 else cv2.COLOR_BGR2RGB)
                out.append((FrameRef(name, i, None if fps is None else round(i / fps, 3)), rgb))
        finally:
            cap.release()
    if not out:
        raise VideoError(f"{name}: a video clip without a readable frame")
    return out
