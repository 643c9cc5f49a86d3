"""How much memory a process holds, and keeping it within a budget.

The gallery cache is the one structure that grows with the corpus a run touches; everything
else a scoring process holds is fixed (the libraries, the model) or lives for one batch (stage-2
temporaries). A :class:`MemoryBudget` caps the cache so that the resident set (RSS, what users
and schedulers measure) stays under ``memory_gb``: before the first batch the cache gets what
the budget leaves above the process's resident set (less a reserve for one batch's temporaries),
and after each batch, when the resident set is over that mark, freed memory is handed back to
the OS and the cache shrinks (least recently used first) by the excess; when there is room again
it may grow back, up to ``cache_bytes`` when one is given (by default the budget alone bounds it:
at 685 normals, Wide-ResNet50-2, 4 GiB hold every prepared gallery). Reading RSS needs Linux
(``/proc/self/statm``); elsewhere, or without a budget, the cache keeps ``cache_bytes`` (1 GiB by
default).
"""

from __future__ import annotations

import ctypes
import os
import sys

GIB = 2**30
# One batch's temporaries above the settled resident set (stage 2 over 50 galleries, decoding
# ahead, what the allocator keeps): the peak of a 48-image run at 685 normals, 224 px, Wide-ResNet50-2
# was 0.3-0.5 GB above its settled resident set (benchmarks/README.md, "The user's run").
RESERVE_BYTES = 512 << 20
FLOOR_BYTES = 64 << 20  # the cache never gets less (one query's galleries at small crops)
UNBUDGETED_CACHE_BYTES = 1 << 30  # the cache's bound without a budget (memory_gb None) or cache_bytes


def resident_bytes() -> int | None:
    """This process's resident set now, in bytes (None where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def glibc():
    """The C library when it is glibc (``mallopt``, ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand the heap's free memory back to the OS now (glibc's ``malloc_trim``; nothing
    elsewhere)."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


class MemoryBudget:
    """Caps a :class:`~spade_faiss.galleries.GalleryCache` so that the process stays under
    ``memory_gb`` GiB resident (None: no budget, the cache keeps its own bound)."""

    def __init__(self, memory_gb: float | None, cache_bytes: int | None = None):
        self.limit = None if memory_gb is None else int(memory_gb * GIB)
        # The cache's own bound: the one given, else none beyond the budget (what it leaves), else 1 GiB
        self.cache_bytes = int(cache_bytes if cache_bytes is not None else self.limit or UNBUDGETED_CACHE_BYTES)
        self.started = False

    @property
    def target(self) -> int | None:
        return None if self.limit is None else self.limit - RESERVE_BYTES

    def start(self, cache) -> None:
        """Before the first batch: the cache gets what the budget leaves."""
        if self.started:
            return
        self.started = True
        self._fit(cache, trim=False)

    def settle(self, cache) -> None:
        """After a batch: back under the mark (freed memory handed back, the cache shrunk by the
        excess), or the cache allowed to grow into the room left."""
        self._fit(cache, trim=True)

    def _fit(self, cache, trim: bool) -> None:
        rss = resident_bytes() if self.limit is not None else None
        if rss is None:
            return
        if trim and rss > self.target:
            release_freed_memory()
            rss = resident_bytes()
        room = self.target - rss  # negative: over the mark
        cache.resize(max(FLOOR_BYTES, min(self.cache_bytes, cache.nbytes + room)))
        if room < 0 and trim:
            release_freed_memory()
