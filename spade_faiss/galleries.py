"""GalleryCache: bounded bytes of per-image gallery features, so that queries which share
neighbours do not re-read (or re-convert) them from the store.

Eviction is least frequently used first (ties: least recently used), with use counts kept for
every key ever asked for, cached or not. A query asks for its ``k_gallery`` nearest normal
images, so over a run each image is asked for at a rate of its own (retrieval has hubs: images
near many others); when the cache holds most but not all of what a run asks for, least recently
used eviction throws out images just before they are asked for again (on the user's run, 685
normals with 92% of them fitting: 20 of each query's 50 images read again), while keeping the
most asked-for ones misses only the rarely asked.

What the bound evicts goes to the spill (``spill.py``) when there is one: a private file that a
later miss reads back, a copy, instead of reading and preparing the image again."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Sequence

import numpy as np

from .resample import concat_levels
from .spill import Spill


class GalleryCache:
    """Cache of ``load(keys) -> list of values`` where a value is a dict of arrays.

    Parameters
    ----------
    load : callable
        Reads the values of several keys at once (hashable keys, e.g. ``(mode, image id)``;
        they arrive sorted ascending).
    max_bytes : int
        Cached arrays beyond this many bytes are evicted, least frequently used first (ties:
        least recently used).
    spill : Spill, optional
        Where evicted values go, to be read back by a later miss (``spill.py``).
    """

    def __init__(self, load: Callable[[list], list], max_bytes: int, spill: Spill | None = None):
        self.load = load
        self.max_bytes = int(max_bytes)
        self.spill = spill
        self._items: OrderedDict[Hashable, dict] = OrderedDict()  # least recently used first
        self._uses: Counter = Counter()  # every key ever asked for
        self.nbytes = 0
        self.hits = 0
        self.misses = 0  # values loaded (read from the corpus and prepared)
        self.restored = 0  # values read back from the spill
        self.bytes_read = 0

    def get(self, keys: Sequence[Hashable]) -> list[dict]:
        """Values for ``keys`` in the given order."""
        self._uses.update(keys)
        missing = sorted({k for k in keys if k not in self._items})
        self.hits += sum(1 for k in keys if k not in missing)
        fresh = self._restore([k for k in missing if self.spill is not None and k in self.spill])
        unread = [k for k in missing if k not in fresh]
        self.misses += len(unread)
        loaded = dict(zip(unread, self.load(unread))) if unread else {}
        self.bytes_read += sum(_size(v) for v in loaded.values())
        fresh.update(loaded)
        out = [fresh[k] if k in fresh else self._touch(k) for k in keys]
        for k, v in fresh.items():
            self._put(k, v)
        self._evict()  # once per call: the fresh values compete with the cached ones
        return out

    def _restore(self, keys: list) -> dict:
        """Values of ``keys`` read back from the spill (a key whose read fails is loaded instead)."""
        out = {}
        for k in keys:
            try:
                out[k] = self.spill.get(k)
            except OSError as e:
                self.spill.stop(f"a read failed: {e}")
                break
        self.restored += len(out)
        return out

    def _touch(self, key: Hashable) -> dict:
        self._items.move_to_end(key)
        return self._items[key]

    def _put(self, i: Hashable, value: dict) -> None:
        size = _size(value)
        if size > self.max_bytes:  # never cached: straight to the spill
            if self.spill is not None:
                self.spill.put(i, value)
            return
        self._items[i] = value
        self.nbytes += size

    def resize(self, max_bytes: int) -> None:
        """A new bound (the memory budget's, ``memory.py``): least frequently used values go first."""
        self.max_bytes = int(max_bytes)
        self._evict()

    def _evict(self) -> None:
        if self.nbytes <= self.max_bytes:
            return
        recency = {k: i for i, k in enumerate(self._items)}
        for key in sorted(self._items, key=lambda k: (self._uses[k], recency[k])):
            if self.nbytes <= self.max_bytes:
                break
            value = self._items.pop(key)
            self.nbytes -= _size(value)
            if self.spill is not None:
                self.spill.put(key, value)

    @property
    def hit_rate(self) -> float:
        """Share of the values asked for that were in memory (neither loaded nor read back)."""
        total = self.hits + self.misses + self.restored
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
