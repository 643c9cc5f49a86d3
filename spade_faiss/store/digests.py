"""Per-image digests of the stored bytes: damage of any kind found when a row is read.

HDF5's fletcher32 misses some damage (it cannot tell a word 0x0000 from 0xFFFF), and a lossless
filter decodes some damaged chunks into other numbers. So each image's stored row of each part
(the pooled vector, every level) has the sha256 of its bytes, as written, kept beside the rows
(``digests/<part>``, ``store/names.py``); a reader recomputes it for every row it reads (about
2 ms per image's levels at 1.5 GB/s) and refuses a row that differs, naming the image.

A digest of all zero bytes means "none recorded" (rows written by a version before 0.3.1, without digests):
such rows are read unchecked, as before.
"""

from __future__ import annotations

import hashlib

import numpy as np

from . import names
from .layout import DIGEST_BYTES

UNSET = bytes(DIGEST_BYTES)


def row_digests(rows: np.ndarray) -> np.ndarray:
    """The sha256 of each row's bytes (C order, the stored dtype): uint8 (n, 32)."""
    rows = np.ascontiguousarray(rows)
    out = np.empty((len(rows), DIGEST_BYTES), np.uint8)
    for i, row in enumerate(rows):
        out[i] = np.frombuffer(hashlib.sha256(row.data).digest(), np.uint8)
    return out


def mismatched(rows: np.ndarray, recorded: np.ndarray) -> list[int]:
    """Positions of ``rows`` whose digest differs from the recorded one (rows without a
    recorded digest are not checked)."""
    actual = row_digests(rows)
    return [i for i in range(len(rows)) if recorded[i].tobytes() != UNSET and
            not np.array_equal(actual[i], recorded[i])]


def write(h5, part: str, start: int, rows: np.ndarray) -> None:
    """Record the digests of ``rows`` (as stored), written at rows ``start:`` of ``part``, in
    an open corpus file that keeps digests (others are left as they are)."""
    if names.DIGESTS not in h5:
        return
    d = h5[names.digest(part)]
    if d.shape[0] < start + len(rows):
        d.resize(start + len(rows), axis=0)
    d[start:start + len(rows)] = row_digests(rows)


def check(h5, part: str, ids: np.ndarray, rows: np.ndarray, read) -> list[int]:
    """Positions of stored ``rows`` (of images ``ids``, any order, repeats allowed) whose bytes
    differ from their recorded digests; ``read(name, selection)`` reads the file."""
    if names.DIGESTS not in h5 or not len(ids):
        return []
    name = names.digest(part)
    width = h5[name].shape[1]
    unique, back = np.unique(ids, return_inverse=True)
    known = unique[unique < h5[name].shape[0]]  # rows past it were written without digests
    recorded = np.zeros((len(unique), width), np.uint8)
    if len(known) and known[-1] - known[0] + 1 == len(known):  # a range (a whole pool read): one slice
        recorded[:len(known)] = read(name, np.s_[int(known[0]):int(known[-1]) + 1])
    elif len(known):
        recorded[:len(known)] = read(name, list(known.tolist()))
    return mismatched(rows, recorded[back.reshape(-1)])
