"""How the process allocates memory: keep freed memory for reuse.

glibc hands large blocks back to the OS as soon as they are freed (``mmap``'d blocks over a
dynamic threshold, heap tops over twice that), so the next image's backbone activations and
stage-2 buffers arrive as fresh pages, one page fault per 4 KiB. On this 2-core machine that
made the backbone 1.3-1.5x slower in the scoring loop than alone (benchmarks/README.md). Raising
the two thresholds keeps those blocks in the heap; peak RSS measured the same.
"""

from __future__ import annotations

import os

from .. import memory

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 64 << 20  # blocks below this come from the heap (and are reused)
TRIM_THRESHOLD = 64 << 20  # free memory kept at the top of the heap
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (unless the user set either through glibc's own
    environment variables). True when applied; False off glibc (nothing to do there)."""
    libc = memory.glibc()
    if libc is None or any(v in os.environ for v in USER_VARIABLES):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


release_freed_memory = memory.release_freed_memory  # after a phase whose buffers will not be needed again
