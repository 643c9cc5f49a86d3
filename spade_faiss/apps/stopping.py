"""How a long command stops when asked: Ctrl-C (SIGINT) interrupts the work at once, as Python
does, and is also remembered, so that an interrupt Python loses (one that lands while a
finalizer runs is printed as "ignored" and dropped) still stops the command at its next
committed row. Either way the command exits 130 with what it committed kept."""

from __future__ import annotations

import contextlib
import signal
import threading


class Stop:
    """Whether a stop was asked for; :meth:`check` raises ``KeyboardInterrupt`` when it was."""

    def __init__(self):
        self.requested = threading.Event()

    def check(self) -> None:
        if self.requested.is_set():
            raise KeyboardInterrupt

    def _handler(self, signum, frame):
        self.requested.set()
        raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_interrupt():
    """Within the block, SIGINT sets the returned :class:`Stop` and raises ``KeyboardInterrupt``
    (the previous handler is restored after it). Off the main thread, nothing is installed."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGINT, stop._handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
