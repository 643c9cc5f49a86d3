"""Progress of long commands on stderr: a tqdm bar on a terminal, and off a terminal (nohup,
CI, a log file) one line every ``every_s`` seconds with the count, the rate and the ETA."""

from __future__ import annotations

import sys
import time

LINE_EVERY_S = 10.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """``update(n)`` after each n items; use as a context manager (a last line at the end).

    Parameters
    ----------
    total : int
    what : str
        What is being done, e.g. ``"scoring"``.
    stream : file
        Default ``sys.stderr``.
    every_s : float
        Seconds between lines when the stream is not a terminal (default ``LINE_EVERY_S``).
    """

    def __init__(self, total: int, what: str, stream=None, every_s: float | None = None, done: int = 0):
        self.total, self.what = total, what
        self.every_s = LINE_EVERY_S if every_s is None else every_s
        self.stream = stream or sys.stderr
        self.count = done
        self.start = time.perf_counter()
        self.first = done
        self.last_line = self.start
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, desc=what, unit="img", file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last_line >= self.every_s:
            self.last_line = now
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        rate = (self.count - self.first) / elapsed if elapsed > 0 else 0.0
        left = self.total - self.count
        eta = f", ETA {_duration(left / rate)}" if rate > 0 and left > 0 else ""
        pct = 100.0 * self.count / self.total if self.total else 100.0
        print(f"{self.what}: {self.count}/{self.total} ({pct:.0f}%), {rate:.2f} img/s, "
              f"elapsed {_duration(elapsed)}{eta}", file=self.stream, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        elif exc[0] is None:
            self._line(time.perf_counter())
