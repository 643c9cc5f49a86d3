"""GalleryCache: a bounded-bytes LRU of per-image gallery features keyed by image id, so that
queries which share neighbours do not re-read (or re-convert) them from the store."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np


class GalleryCache:
    """LRU cache of ``load(ids) -> list of values`` where a value is a dict of arrays.

    Parameters
    ----------
    load : callable
        Reads the values of several image ids at once (the ids arrive sorted ascending).
    max_bytes : int
        Cached arrays beyond this many bytes are evicted, least recently used first.
    """

    def __init__(self, load: Callable[[np.ndarray], list], max_bytes: int):
        self.load = load
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[int, dict] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.bytes_read = 0

    def get(self, ids: Sequence[int]) -> list[dict]:
        """Values for ``ids`` in the given order."""
        ids = [int(i) for i in ids]
        missing = sorted({i for i in ids if i not in self._items})
        self.hits += len(ids) - len([i for i in ids if i in missing])
        self.misses += len(missing)
        fresh = dict(zip(missing, self.load(np.array(missing, dtype=np.int64)))) if missing else {}
        self.bytes_read += sum(_size(v) for v in fresh.values())
        out = [fresh[i] if i in fresh else self._touch(i) for i in ids]
        for i, v in fresh.items():
            self._put(i, v)
        return out

    def _touch(self, i: int) -> dict:
        self._items.move_to_end(i)
        return self._items[i]

    def _put(self, i: int, value: dict) -> None:
        size = _size(value)
        if size > self.max_bytes:
            return
        self._items[i] = value
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= _size(old)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _size(value: dict) -> int:
    return sum(a.nbytes for a in value.values())
