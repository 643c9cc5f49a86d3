"""Per-image digests of the stored bytes: damage of any kind found when a row is read.

HDF5's fletcher32 misses some damage (it cannot tell a word 0x0000 from 0xFFFF), and a lossless
filter decodes some damaged chunks into other numbers. So each image's stored row of each part
(the pooled vector, every level) has the sha256 of its bytes, as written, kept beside the rows
(``digests/<part>``, ``store/names.py``); a reader recomputes it for every row it reads (about
2 ms per image's levels at 1.5 GB/s) and refuses a row that differs, naming the image.

Each image's path and sha256 (the ``images/`` columns) have one more (``digests/names``: the sha256 of
the path's UTF-8 bytes, a zero byte and the sha256's ASCII), checked by ``verify``; these columns
carry no chunk checksum (``layout.py`` says why).

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


def name_digests(paths, sha256s) -> np.ndarray:
    """The ``digests/names`` rows of images with these paths and sha256s: uint8 (n, 32)."""
    out = np.empty((len(paths), DIGEST_BYTES), np.uint8)
    for i, (p, s) in enumerate(zip(paths, sha256s)):
        text = p.encode("utf-8", "replace") + b"\0" + s.encode("ascii", "replace")  # damaged: differs
        out[i] = np.frombuffer(hashlib.sha256(text).digest(), np.uint8)
    return out


def write_names(h5, start: int, paths, sha256s) -> None:
    """Record the name digests of images written at rows ``start:`` (files that keep them)."""
    if names.digest(names.NAMES_PART) in h5:
        _write(h5[names.digest(names.NAMES_PART)], start, name_digests(paths, sha256s))


def names_mismatched(h5, paths, sha256s) -> list[int]:
    """Rows whose path or sha256 differs from its recorded name digest (none recorded: unchecked)."""
    name = names.digest(names.NAMES_PART)
    if name not in h5 or not len(paths):
        return []
    recorded = np.zeros((len(paths), DIGEST_BYTES), np.uint8)
    have = min(len(paths), h5[name].shape[0])
    recorded[:have] = h5[name][:have]
    actual = name_digests(paths, sha256s)
    return [i for i in range(len(paths))
            if recorded[i].tobytes() != UNSET and not np.array_equal(actual[i], recorded[i])]


def _write(d, start: int, rows: np.ndarray) -> None:
    if d.shape[0] < start + len(rows):
        d.resize(start + len(rows), axis=0)
    d[start:start + len(rows)] = rows


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
    _write(h5[names.digest(part)], start, row_digests(rows))


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
