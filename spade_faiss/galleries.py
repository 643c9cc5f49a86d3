"""GalleryCache: a bounded-bytes LRU of per-image gallery features, so that queries which share
neighbours do not re-read (or re-convert) them from the store."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import numpy as np

from .resample import concat_levels


class GalleryCache:
    """LRU cache of ``load(keys) -> list of values`` where a value is a dict of arrays.

    Parameters
    ----------
    load : callable
        Reads the values of several keys at once (hashable keys, e.g. ``(mode, image id)``;
        they arrive sorted ascending).
    max_bytes : int
        Cached arrays beyond this many bytes are evicted, least recently used first.
    """

    def __init__(self, load: Callable[[list], list], max_bytes: int):
        self.load = load
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, dict] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.bytes_read = 0

    def get(self, keys: Sequence[Hashable]) -> list[dict]:
        """Values for ``keys`` in the given order."""
        missing = sorted({k for k in keys if k not in self._items})
        self.hits += sum(1 for k in keys if k not in missing)
        self.misses += len(missing)
        fresh = dict(zip(missing, self.load(missing))) if missing else {}
        self.bytes_read += sum(_size(v) for v in fresh.values())
        out = [fresh[k] if k in fresh else self._touch(k) for k in keys]
        for k, v in fresh.items():
            self._put(k, v)
        return out

    def _touch(self, key: Hashable) -> dict:
        self._items.move_to_end(key)
        return self._items[key]

    def _put(self, i: Hashable, value: dict) -> None:
        size = _size(value)
        if size > self.max_bytes:
            return
        self._items[i] = value
        self.nbytes += size
        self._evict()

    def resize(self, max_bytes: int) -> None:
        """A new bound (the memory budget's, ``memory.py``): least recently used values go first."""
        self.max_bytes = int(max_bytes)
        self._evict()

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and self._items:
            _, old = self._items.popitem(last=False)
            self.nbytes -= _size(old)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _size(value: dict) -> int:
    return sum(a.nbytes for a in value.values())  # arrays, or engine entries with ``nbytes``


def load_entries(read_level: Callable, keys: list, levels: tuple) -> list[dict]:
    """Features of ``keys`` = ``(pixel_mode, image id)``: per image, the stored (h, w, C) array
    per level (stored dtype), or one float32 ``concat`` array. ``read_level(level, ids)`` reads
    the stored rows."""
    ids = np.array([i for _, i in keys], dtype=np.int64)
    raw = {lv: read_level(lv, ids) for lv in levels}
    out = []
    for j, (mode, _) in enumerate(keys):
        # each image's own copy: a view would keep the whole read alive while any of its images
        # stays cached, and the cache (which counts each image's bytes) would exceed its budget
        per = {lv: raw[lv][j].copy() for lv in levels}
        if mode == "concat":
            per = {"concat": concat_levels([per[lv][None] for lv in levels])[0]}
        out.append(per)
    return out
