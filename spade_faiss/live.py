"""Live frames for ``spade-faiss watch``: a camera (its index, ``0``), a stream URL (``rtsp://``,
``http://``: anything OpenCV's FFmpeg backend opens), a video file played at its own frame rate
(``loop``: from the start again at its end, a stand-in for a camera), or a folder that grows
(each new image file a frame, taken once it has stopped growing).

A reader thread takes frames as the source gives them and keeps at most ``buffer`` of them: a
frame that arrives with the buffer full pushes out the oldest, counted as dropped. The scorer
always gets the newest frames, and memory stays bounded whatever the source's rate and however
slow the scoring. Frames are numbered in the order the source gave them (every one, dropped or
not), so that a frame reference ``SOURCE#frame=N&t=S`` says where it was in the stream; ``t`` is
the video's own time for a file, the seconds since the watch started for a camera or a stream.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import threading
import time

import cv2
import numpy as np

from .datasets import is_image_name
from .images import ImageError, load_image
from .video import FrameRef, VideoError, is_live_source, is_video_name

log = logging.getLogger(__name__)

FOLDER_POLL_S = 0.2


@dataclasses.dataclass
class LiveFrame:
    path: str  # a frame reference, or the image file's path (a folder's frame)
    rgb: np.ndarray  # (H, W, 3) uint8
    captured: float  # time.monotonic() when the reader took it


class LiveSource:
    """Frames of ``source`` as they come (see the module docstring); use as a context manager.

    Attributes (read at any time): ``read`` frames taken from the source (after ``stride``),
    ``dropped`` frames pushed out of the buffer unscored, ``ended`` (a file or stream that ran
    out, not looping), ``error`` (why the source stopped, if it failed).
    """

    def __init__(self, source: str, buffer: int = 1, stride: int = 1, loop: bool = False):
        self.source, self.stride, self.loop = str(source), stride, loop
        self.kind = _kind(self.source)
        self.frames: collections.deque[LiveFrame] = collections.deque()
        self.buffer = buffer
        self.read = self.dropped = 0
        self.ended, self.error = False, None
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spade-live", daemon=True)

    def __enter__(self) -> LiveSource:
        if self.kind == "capture":
            self._cap = self._open()  # a source that cannot be opened is an error now, not in the thread
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def get(self, timeout: float) -> LiveFrame | None:
        """The oldest buffered frame, waiting up to ``timeout`` seconds; None when there is none
        (then ``ended`` says whether more can come)."""
        with self._ready:
            if not self.frames and not self.ended:
                self._ready.wait(timeout)
            return self.frames.popleft() if self.frames else None

    # --- the reader thread ------------------------------------------------------------------

    def _offer(self, path: str, rgb: np.ndarray) -> None:
        with self._ready:
            self.read += 1
            if len(self.frames) >= self.buffer:
                self.frames.popleft()
                self.dropped += 1
            self.frames.append(LiveFrame(path, rgb, time.monotonic()))
            self._ready.notify()

    def _finish(self, error: str | None = None) -> None:
        with self._ready:
            self.ended, self.error = True, error
            self._ready.notify_all()

    def _run(self) -> None:
        try:
            self._read_folder() if self.kind == "folder" else self._read_capture()
            self._finish()
        except Exception as e:  # the source failed mid-stream: the frames taken stay scored
            log.warning("%s: %s", self.source, e)
            self._finish(f"{type(e).__name__}: {e}")

    def _open(self) -> cv2.VideoCapture:
        target = int(self.source) if self.source.isdigit() else self.source
        cap = cv2.VideoCapture(target) if self.source.isdigit() else cv2.VideoCapture(target, cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            raise VideoError(f"{self.source}: cannot be opened as a camera, stream or video (OpenCV)")
        return cap

    def _read_capture(self) -> None:
        cap, n = self._cap, 0
        fps = cap.get(cv2.CAP_PROP_FPS)
        paced = self.kind == "capture" and os.path.isfile(self.source)  # a file plays at its own rate
        fps = fps if math.isfinite(fps) and fps > 0 else None
        start, first = time.monotonic(), n
        try:
            while not self._stop.is_set():
                ok, bgr = cap.read()
                if not ok:
                    if not (paced and self.loop and n > first):
                        return
                    cap.release()
                    cap, first = self._open(), n  # from the start again; numbering goes on
                    continue
                if paced and fps:
                    wait = start + (n + 1) / fps - time.monotonic()
                    if wait > 0:
                        self._stop.wait(wait)
                t = n / fps if paced and fps else time.monotonic() - self._start
                if n % self.stride == 0:
                    ref = FrameRef(self.source, n, round(t, 3))
                    self._offer(ref.path, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                n += 1
        finally:
            cap.release()

    def _read_folder(self) -> None:
        seen: set[str] = set()
        sizes: dict[str, int] = {}
        k = 0
        while not self._stop.is_set():
            for name in sorted(os.listdir(self.source)):
                path = os.path.join(self.source, name)
                if path in seen or not is_image_name(name):
                    continue
                size = os.path.getsize(path)
                if sizes.get(path) != size:  # still being written: taken when it stops growing
                    sizes[path] = size
                    continue
                seen.add(path)
                sizes.pop(path, None)
                if k % self.stride == 0:
                    try:
                        self._offer(path, load_image(path).rgb)
                    except (ImageError, OSError) as e:
                        log.warning("%s: skipped (%s)", path, e)
                k += 1
            self._stop.wait(FOLDER_POLL_S)


def _kind(source: str) -> str:
    if os.path.isdir(source):
        return "folder"
    if is_live_source(source) or (os.path.isfile(source) and is_video_name(source)):
        return "capture"
    if os.path.exists(source):
        raise ValueError(f"{source}: not a camera index, a stream URL, a video file or a folder")
    raise FileNotFoundError(f"{source}: no such file or folder (a camera is its index, e.g. 0; a stream its URL)")
