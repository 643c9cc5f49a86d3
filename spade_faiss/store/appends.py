"""Appends beside a served corpus: how a corpus grows while other processes read it.

HDF5 locks a file for its one writer, and a process that reads it (``serve``, ``score``)
keeps it open, so an append in place has to wait for every reader to close. Instead, a writer
that finds the corpus open elsewhere commits each batch as a *segment*: a small corpus file of
the same configuration and fitted representations, written whole under a temporary name and
renamed into ``<corpus>.appends/`` (a rename is atomic: a segment is there whole or not at
all). Readers see the corpus file's rows and then each segment's, in segment order
(``view.py``), and pick up new segments when they refresh. Thresholds calibrated meanwhile go
to ``<corpus>.appends/thresholds.json`` the same way.

The next writer that has the corpus file to itself merges the segments into it (rows copied
as stored, deduplicated by sha256, so a merge cut short is finished by the next one) and
removes them: the ids and scores are the same before and after (docs/design.md §2, "Growing
while served").

Images removed while the corpus is read are recorded the same way, in
``<corpus>.appends/removed.json`` (sha256 -> the path it was indexed from): readers exclude them
from retrieval when they refresh, and the next writer that has the corpus file to itself rewrites
it without them (``Spade.open(mode="a")``), then deletes the record.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path

from . import names
from .names import appends_dir

SUFFIX = names.APPENDS_SUFFIX
THRESHOLDS = names.THRESHOLDS_FILE
REMOVED = names.REMOVED_FILE
LOCK = names.WRITER_LOCK
_SEGMENT = names.SEGMENT


def segment_paths(path) -> list[str]:
    """The committed segments of corpus ``path``, in commit order (temporary files left out)."""
    folder = appends_dir(path)
    if not folder.is_dir():
        return []
    return [str(folder / n) for n in sorted(os.listdir(folder)) if _SEGMENT.match(n)]


def next_segment_path(path) -> str:
    existing = [Path(p).name for p in segment_paths(path)]
    number = int(_SEGMENT.match(existing[-1]).group(1)) + 1 if existing else 1
    return str(appends_dir(path) / names.segment_name(number))


class WriterLock:
    """One writer at a time beside a corpus: an exclusive ``flock`` on
    ``<corpus>.appends/.writer.lock``, released on close (or when the process dies)."""

    def __init__(self, path):
        folder = appends_dir(path)
        folder.mkdir(exist_ok=True)
        self.fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise BlockingIOError(f"{path}: another process is appending to it; retry when it has finished") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def remove_temporaries(path) -> None:
    """Segments a killed writer left half-written (under the writer lock: none is being written)."""
    folder = appends_dir(path)
    for name in os.listdir(folder) if folder.is_dir() else []:
        if ".tmp-" in name:
            os.remove(folder / name)


def write_thresholds(path, thresholds: dict) -> None:
    """Thresholds beside corpus ``path`` (atomic: the old file or the new one)."""
    folder = appends_dir(path)
    folder.mkdir(exist_ok=True)
    tmp = Path(names.temporary(folder / THRESHOLDS))
    tmp.write_text(json.dumps(thresholds, sort_keys=True))
    os.replace(tmp, folder / THRESHOLDS)


def read_thresholds(path) -> dict | None:
    file = appends_dir(path) / THRESHOLDS
    try:
        text = file.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{file}: not a thresholds record ({e})") from None
    return check_thresholds(record, str(file))


def check_thresholds(record, where: str) -> dict:
    """A thresholds record as ``calibrate`` writes it (finite numbers ``tau`` and ``theta``), or
    ``ValueError`` naming ``where`` and what is wrong: a hand-edited or damaged record is refused
    where it is read, never used."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a thresholds record must be a JSON object, not {type(record).__name__}")
    for key in ("tau", "theta"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: {key}={value!r}: expected a finite number")
    return record


def read_removed(path) -> dict[str, str]:
    """Images removed beside corpus ``path`` and not compacted yet: ``{sha256: path}``."""
    file = appends_dir(path) / REMOVED
    try:
        record = json.loads(file.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise ValueError(f"{file}: not a removal record ({e})") from None
    if not isinstance(record, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in record.items()):
        raise ValueError(f"{file}: not a removal record (expected an object of sha256 -> path)")
    return record


def write_removed(path, removed: dict[str, str]) -> None:
    """Add ``removed`` (``{sha256: path}``) to the record beside corpus ``path`` (atomic: the
    old record or the new one); the caller holds the writer lock."""
    folder = appends_dir(path)
    folder.mkdir(exist_ok=True)
    record = {**read_removed(path), **removed}
    tmp = Path(names.temporary(folder / REMOVED))
    tmp.write_text(json.dumps(record, sort_keys=True))
    os.replace(tmp, folder / REMOVED)


def clear_removed(path) -> None:
    """The removal record, once the corpus file has been rewritten without those images (by a
    writer with the file to itself: no writer beside it holds the lock)."""
    folder = appends_dir(path)
    (folder / REMOVED).unlink(missing_ok=True)
    if folder.is_dir() and set(os.listdir(folder)) <= {LOCK}:
        (folder / LOCK).unlink(missing_ok=True)
        folder.rmdir()


def set_aside_orphans(path, stamp: str) -> Path | None:
    """A segments folder beside a corpus being created belongs to a deleted corpus of that name:
    rename it out of the way (kept, never adopted); returns its new name, or None."""
    folder = appends_dir(path)
    if not folder.is_dir():
        return None
    target = names.orphaned(folder, stamp)
    os.rename(folder, target)
    return target


def clear(path) -> None:
    """Remove the segments and thresholds once merged into the corpus file, then the folder."""
    folder = appends_dir(path)
    for p in segment_paths(path) + [str(folder / THRESHOLDS), str(folder / LOCK)]:
        if os.path.exists(p):
            os.remove(p)
    if folder.is_dir() and not os.listdir(folder):
        folder.rmdir()
