"""How much memory a process holds, and keeping it within a budget.

The gallery cache is the one structure that grows with the corpus a run touches; everything
else a scoring process holds is fixed (the libraries, the model) or lives for one batch (stage-2
temporaries: the batch's galleries as read and prepared, the bound GEMM's blocks). A
:class:`MemoryBudget` caps the cache so that the resident set (RSS, what users and schedulers
measure) stays under ``memory_gb``: the cache gets what the budget leaves above the process's
settled resident set, less one batch's work. That work is at least ``RESERVE_BYTES``, and
the largest rise above a batch's starting resident set seen in a batch that raised the
process's peak (``VmHWM``; the cache's own growth in that batch left out) when that is more.
The first batch runs with the cache at its floor: every gallery it reads is then its own work
(held for its search, not counted as cache), the most a batch can hold beyond the cache, and it
is measured before the cache takes any of the budget. A batch whose galleries the cache serves
measures less: with the first measurement taken from such a batch, the user's run peaked at
4.28 GiB under a 4 GiB budget (sixteenth wave), and with the cache given the budget less
``RESERVE_BYTES`` from the start, ``calibrate`` peaked at 2.01 GiB and ``--stage2 faiss`` (float32
galleries) at 2.13 under 2 GiB (nineteenth wave). The rise includes what the allocator keeps of
freed memory, which grows with the cache's churn: the estimate errs large, so the peak stays
under the budget. A batch starts from the budget less that work and ``WORK_MARGIN`` of it
more (batches' rises vary around the largest seen).
After each batch, when the resident set is over its mark, freed memory is handed back to the OS
and the cache shrinks (least frequently used first) by the excess; when there is room again it
may grow back, up to ``cache_bytes`` when one is given (by default the budget alone bounds it).
A budget smaller than the process without a cache plus one batch's work cannot be kept: the
cache keeps its floor and the run warns once, with the figures (``held``). Reading RSS needs
Linux (``/proc/self``); elsewhere, or without a budget, the cache keeps ``cache_bytes`` (1 GiB
by default).

What the cache evicts goes to the spill (``spill.py``), from which a later miss reads it back
in ~2 ms instead of ~15-20 to read and prepare it: a small budget costs little speed (the
user's run: 0.53 s per image under the default 2 GiB, nineteenth wave; without a spill, 1.04 s
under 4 GiB).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

GIB = 2**30
# One batch's work above its starting resident set, at least: at 685 normals, 224 px,
# Wide-ResNet50-2, K=50, a batch measured 0.4-0.45 GiB once the pruned engine stopped making a
# new oneDNN primitive per call (eighteenth wave: the whole user run under a 2 GiB budget
# peaked at 1.96 GiB, the work never learned above this floor). Before, every batch's rise
# included the primitive cache's growth (~3 MB per image) and measured 0.97-1.0 GiB, and a
# 0.5 GiB floor let a 4 GiB budget peak at 4.13 GiB (seventeenth wave).
RESERVE_BYTES = 1 << 29
# A batch's rise varies around the largest learned (the user's run, nineteenth wave: the fast
# mode's batches, the floor their work, rose to 0.514 GiB once, 14 MiB over a 2 GiB budget): a
# batch may start from the budget less the work and this share of it more.
WORK_MARGIN = 0.15
FLOOR_BYTES = 64 << 20  # the cache never gets less (one query's galleries at small crops)
UNBUDGETED_CACHE_BYTES = 1 << 30  # the cache's bound without a budget (memory_gb None) or cache_bytes


def resident_bytes() -> int | None:
    """This process's resident set now, in bytes (None where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_resident_bytes() -> int | None:
    """This process's largest resident set so far (``VmHWM``), in bytes (None without /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
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
        self.work = RESERVE_BYTES  # one batch's work above its starting resident set: at least this, learned
        self.held: dict | None = None  # set when the budget cannot be kept (the figures of the warning)
        self._mark: tuple | None = None

    @property
    def target(self) -> int | None:
        """The resident set a batch may start from: the budget less one batch's work and its
        margin (``WORK_MARGIN``)."""
        return None if self.limit is None else self.limit - self.reserve

    @property
    def reserve(self) -> int:
        """What a batch is given above where it starts: its work and ``WORK_MARGIN`` of it more."""
        return int(self.work * (1 + WORK_MARGIN))

    def start(self, cache) -> None:
        """Before the first batch: the cache is held at its floor for that batch (its work is
        measured with nothing cached, module doc), and the marks that work is measured from are
        set (later batches are measured from the settle before them). The first batch of a cold
        process reads its galleries from the corpus anyway."""
        if self.limit is None or self.started:
            return
        self.started = True
        cache.resize(min(cache.max_bytes, FLOOR_BYTES))
        self._mark = (resident_bytes(), peak_resident_bytes(), cache.nbytes)

    def settle(self, cache) -> None:
        """After a batch: its work learned when it raised the process's peak; then back under the
        mark (freed memory handed back, the cache shrunk by the excess), or the cache allowed to
        grow into the room left; then the marks the next batch is measured from."""
        if self.limit is None:
            return
        self._learn(cache)
        self._fit(cache)
        self._mark = (resident_bytes(), peak_resident_bytes(), cache.nbytes)

    def _learn(self, cache) -> None:
        """A batch's work: how far it raised the resident set above where it started, less the
        cache's own growth, when it set the process's peak (otherwise its peak is not known)."""
        peak = peak_resident_bytes()
        if self._mark is None or peak is None or None in self._mark:
            return
        rss, peak_before, cached = self._mark
        if peak > peak_before:  # the largest measured, never below RESERVE_BYTES
            self.work = max(self.work, peak - rss - max(0, cache.nbytes - cached))

    def _fit(self, cache) -> None:
        rss = resident_bytes() if self.limit is not None else None
        if rss is None:
            return
        if rss > self.target:
            release_freed_memory()
            rss = resident_bytes()
        room = self.target - rss  # negative: over the mark
        wanted = cache.nbytes + room
        without_cache = rss - cache.nbytes
        cache.resize(max(FLOOR_BYTES, min(self.cache_bytes, wanted)))
        if room < 0:
            release_freed_memory()
        if wanted < FLOOR_BYTES and self.held is None:
            self._warn(without_cache)

    def summary(self, cache) -> dict:
        """What a run records (``run.json``): the budget, one batch's work as learned, the cache's
        bound and size now, whether the budget could be kept, the spill's size, and how many
        gallery images were read back from it and loaded from the corpus."""
        gib = lambda b: None if b is None else round(b / GIB, 3)  # noqa: E731
        spill = cache.spill
        return {"memory_gb": gib(self.limit), "batch_work_gb": gib(self.work), "cache_bound_gb": gib(cache.max_bytes),
                "cache_gb": gib(cache.nbytes), "kept": self.held is None,
                "spill_gb": gib(spill.size) if spill is not None else None, "restored": cache.restored,
                "loaded": cache.misses}

    def _warn(self, without_cache: int) -> None:
        """Once: the budget is below what the process needs with an empty cache."""
        self.held = {"memory_gb": self.limit / GIB, "without_cache_gb": without_cache / GIB,
                     "batch_work_gb": self.work / GIB}
        log.warning("memory_gb=%.3g cannot be kept: this process holds %.2f GiB without a gallery cache and one "
                    "batch's work needs %.2f GiB more, with its margin about %.1f GiB in all; the cache keeps its "
                    "floor (%d MiB), "
                    "so each batch reads most of its galleries from the corpus. Fewer retrieved normal "
                    "images (k_gallery) need less; a larger budget is faster",
                    self.limit / GIB, without_cache / GIB, self.work / GIB, (without_cache + self.reserve) / GIB,
                    FLOOR_BYTES >> 20)
