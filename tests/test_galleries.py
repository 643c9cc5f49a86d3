"""The gallery cache: values by key in the given order, loads only what is missing (sorted),
evicts least recently used entries by bytes."""

import numpy as np

from spade_faiss.galleries import GalleryCache, load_entries


def entry(nbytes):
    return {"x": np.zeros(nbytes, np.uint8)}


def test_hits_misses_and_load_order():
    loads = []

    def load(keys):
        loads.append(list(keys))
        return [entry(10) | {"key": np.array([k])} for k in keys]
    cache = GalleryCache(load, max_bytes=10_000)
    got = cache.get([5, 2, 9])
    assert [int(v["key"][0]) for v in got] == [5, 2, 9] and loads == [[2, 5, 9]]
    got = cache.get([9, 7, 2])
    assert [int(v["key"][0]) for v in got] == [9, 7, 2] and loads[-1] == [7]
    assert (cache.hits, cache.misses) == (2, 4) and cache.hit_rate == 2 / 6


def test_eviction_by_bytes_least_frequently_used_first_ties_least_recently_used():
    cache = GalleryCache(lambda keys: [entry(100) for _ in keys], max_bytes=350)
    cache.get([1, 2, 3])                  # 300 bytes
    cache.get([1])                        # 1 asked twice, and the most recent
    cache.get([4])                        # 400 > 350: evicts 2 (asked once, least recently)
    assert list(cache._items) == [3, 1, 4] and cache.nbytes == 300
    cache.get([5, 6])                     # evicts 3 and 4 (asked once); 1 (twice) stays
    assert list(cache._items) == [1, 5, 6] and cache.nbytes == 300
    too_big = GalleryCache(lambda keys: [entry(1000) for _ in keys], max_bytes=350)
    too_big.get([1])
    assert too_big.nbytes == 0 and not too_big._items  # never cached, still returned
    assert too_big.bytes_read == 1000


def test_what_queries_ask_for_often_stays_cached_through_a_stream_of_rarely_asked_images():
    """Each query asks for several images; a few are asked by many queries (retrieval's hubs).
    With room for 3 images, least recently used eviction would read a hub again after every
    two queries that miss it; counting uses keeps the hubs, and counts outlive eviction."""
    loads = []
    cache = GalleryCache(lambda keys: loads.extend(keys) or [entry(100) for _ in keys], max_bytes=300)
    hubs = lambda q: [0, 1] if q % 3 == 0 else [100 + q]  # noqa: E731
    for q in range(4):                                   # until the hubs have been asked twice
        cache.get(hubs(q))
    known = len(loads)
    for q in range(4, 30):
        cache.get(hubs(q))
    assert not {0, 1} & set(loads[known:])               # then never read again (LRU: every 3rd query)
    cache.get([7])
    cache.get([8])                                       # 7 was evicted by 8 (both asked once) ...
    cache.get([7])
    cache.get([9])                                       # ... asked again it outranks 9: 9 goes
    assert 7 in cache._items and 9 not in cache._items


def test_load_entries_per_level_and_concatenated():
    rows = {"layer1": np.arange(2 * 4 * 4 * 2, dtype=np.float16).reshape(2, 4, 4, 2),
            "layer2": np.ones((2, 2, 2, 3), np.float16)}
    got = load_entries(lambda lv, ids: rows[lv][ids], [("per_level", 1), ("concat", 0)], ("layer1", "layer2"))
    assert got[0]["layer1"].dtype == np.float16 and np.array_equal(got[0]["layer1"], rows["layer1"][1])
    assert got[1]["concat"].shape == (4, 4, 5) and got[1]["concat"].dtype == np.float32
    np.testing.assert_array_equal(got[1]["concat"][..., :2], rows["layer1"][0])
    assert np.all(got[1]["concat"][..., 2:] == 1)


def test_resize_evicts_least_recently_used_first():
    cache = GalleryCache(lambda keys: [entry(100) for _ in keys], max_bytes=1000)
    cache.get([1, 2, 3, 4])
    cache.get([1])
    cache.resize(250)
    assert list(cache._items) == [4, 1] and cache.nbytes == 200


def test_the_memory_budget_gives_the_cache_what_the_process_leaves_and_takes_it_back():
    """Real resident-set readings: a budget just above this process's resident set leaves the
    cache its headroom; a budget below it leaves the floor; no budget leaves cache_bytes."""
    from spade_faiss import memory

    rss = memory.resident_bytes()
    assert rss and rss > 10 << 20
    cache = GalleryCache(lambda keys: [entry(1 << 20) for _ in keys], max_bytes=1 << 40)
    room = 256 << 20
    budget = memory.MemoryBudget((rss + int(memory.RESERVE_BYTES * (1 + memory.WORK_MARGIN)) + room) / memory.GIB,
                                 cache_bytes=1 << 40)
    budget.start(cache)
    assert cache.max_bytes == memory.FLOOR_BYTES  # the first batch's work is measured with nothing cached
    budget.settle(cache)  # this "batch" raised no peak: the work stays RESERVE_BYTES
    assert abs(cache.max_bytes - room) < 64 << 20  # what the process leaves (its RSS moves a little)
    cache.get(list(range(400)))  # 400 MiB asked: the bound holds
    assert cache.nbytes <= cache.max_bytes
    tight = memory.MemoryBudget(rss / memory.GIB / 2, cache_bytes=1 << 40)
    tight.settle(cache)
    assert cache.max_bytes == memory.FLOOR_BYTES and cache.nbytes <= memory.FLOOR_BYTES
    free = memory.MemoryBudget(None, cache_bytes=123 << 20)
    free.start(cache)
    assert cache.max_bytes == memory.FLOOR_BYTES  # no budget: nothing is read or changed


def test_loaded_entries_own_their_memory_so_evicting_one_frees_its_bytes():
    """The store reads several images at once; an image kept in the cache must not hold the
    whole read alive (the cache counts each image's bytes, and obeys its budget only if
    evicting an image frees them)."""
    read = {}

    def read_level(lv, ids):
        read[lv] = np.zeros((len(ids), 3, 3, 4), np.float16)
        return read[lv]
    got = load_entries(read_level, [("per_level", i) for i in range(5)], ("layer1", "layer2"))
    for lv in ("layer1", "layer2"):
        for entry_ in got:
            assert entry_[lv].base is None and not np.shares_memory(entry_[lv], read[lv])


LEARN = r"""
import json, logging, sys
import numpy as np
from spade_faiss import memory
from spade_faiss.galleries import GalleryCache

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
MIB = 1 << 20
cache = GalleryCache(lambda keys: [{"x": np.ones(MIB, np.uint8)} for _ in keys], max_bytes=1 << 40)
rss = memory.resident_bytes()
budget = memory.MemoryBudget((rss + 2048 * MIB) / memory.GIB, cache_bytes=1 << 40)
budget.start(cache)
first = budget.target
first_cache = cache.max_bytes
work = np.ones(300 * MIB, np.uint8)  # a batch of less work than the floor: a new peak, nothing learned
del work
budget.settle(cache)
floor = budget.work
room = cache.max_bytes
work = np.ones(int(sys.argv[1]) * MIB, np.uint8)  # one batch's work: touched pages, a new peak
del work
budget.settle(cache)
learned = budget.work
small = np.ones(8 * MIB, np.uint8)  # a batch below the peak: nothing new is learned
del small
budget.settle(cache)
tight = memory.MemoryBudget((rss + 128 * MIB) / memory.GIB, cache_bytes=1 << 40)
tight.start(cache)
np.ones(int(sys.argv[1]) * MIB, np.uint8)  # no new peak: the prior work (RESERVE_BYTES) stands
tight.settle(cache)
print(json.dumps({"first": first, "first_cache": first_cache, "room": room, "floor": floor, "learned": learned,
                  "after_small": budget.work,
                  "target": budget.target, "limit": budget.limit, "tight_held": tight.held,
                  "summary": tight.summary(cache)}))
"""


def test_the_budget_learns_one_batchs_work_from_the_peak_and_says_when_it_cannot_be_kept():
    """In a fresh process (its peak resident set is this test's own): the first batch's cache is
    its floor (that batch's work is measured with nothing cached); a batch that raises the peak by
    300 MiB leaves the work at ``RESERVE_BYTES`` and the cache then gets the budget less that work
    (a first batch served by the cache must not shrink it: later ones that read their galleries
    overshot the budget), one that raises it by 1400 MiB makes the budget's work
    1400 MiB (the target moves by it), a smaller batch changes nothing, and a budget below the
    process plus one batch's work keeps the cache's floor and warns once with the figures."""
    import json
    import subprocess
    import sys

    from spade_faiss import memory

    done = subprocess.run([sys.executable, "-c", LEARN, "1400"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    mib = 1 << 20
    reserve = lambda work: int(work * (1 + memory.WORK_MARGIN))  # noqa: E731  (the work and its margin)
    assert got["first"] == got["limit"] - reserve(memory.RESERVE_BYTES)  # assumed until measured
    assert got["first_cache"] == memory.FLOOR_BYTES  # the first batch's cache
    assert abs(got["room"] - (2048 * mib - reserve(memory.RESERVE_BYTES))) < 64 * mib  # after it
    assert got["floor"] == memory.RESERVE_BYTES, got
    assert 1380 * mib <= got["learned"] <= 1440 * mib, got  # 1400 MiB of pages, give or take the interpreter's
    assert got["after_small"] == got["learned"] and got["target"] == got["limit"] - reserve(got["learned"])
    assert got["tight_held"] and got["summary"]["kept"] is False and got["summary"]["cache_bound_gb"] == 0.062
    assert done.stderr.count("cannot be kept") == 1, done.stderr
