"""The generations of a corpus file, and rolling back to one (``spade-faiss rollback``).

Each committed change of a corpus file is a generation, numbered from 1 and recorded in the file
(attribute ``generations``: a JSON list of ``{generation, images, change, time, before}``): a
writer that appended images (an ``index`` run, a merge of segments) records one when it closes;
a rewrite (``remove``, ``rollback``) records one in the new file before it replaces the old.

A rewrite keeps the file it replaces as the snapshot of the generation that file held (a hard
link under ``NAME.h5.generations/``: no copy, and never written again, since every later change
goes to the new file), named in the new generation's ``before``. Appends only add rows at the
end, so a generation's images are the first ``images`` rows of the first file after it that a
rewrite kept (its snapshot), or of the current file when no rewrite came since: rolling back
rewrites those rows into a new file (``repair.rewrite``: whole or not at all), itself a new
generation whose ``before`` keeps the state it replaced, so a rollback can be rolled back.

Corpus files written before 0.3.2 have no record: their first generation is recorded by the
next change (with ``images`` the rows then). Segments beside a corpus (``appends.py``) are not
generations of the file until merged into it; a served corpus's own ``generation`` counts them.
"""

from __future__ import annotations

import json
import os

import h5py

from ..clock import utc_now
from . import names
from .errors import StoreError

SUFFIX = ".generations"


def recorded(h5: h5py.File) -> list[dict]:
    """The generations recorded in an open corpus file (oldest first; empty before 0.3.2)."""
    raw = h5.attrs.get(names.GENERATIONS)
    return json.loads(raw) if raw is not None else []


def entry(past: list[dict], change: str, images: int, before: str | None = None) -> list[dict]:
    """The record ``past`` with one more generation: ``change`` (what made it), the ``images``
    it holds, and ``before`` (the snapshot of the generation it replaced, for a rewrite)."""
    number = past[-1]["generation"] + 1 if past else 1
    return past + [{"generation": number, "images": int(images), "change": change, "time": utc_now(),
                    "before": before}]


def current(h5: h5py.File) -> list[dict]:
    """The record with the file's committed state as its last generation: one more ("append")
    when rows were committed since the last ("as found": a file of a version before 0.3.2)."""
    past, n = recorded(h5), int(h5.attrs[names.N_COMMITTED])
    if past and past[-1]["images"] == n:
        return past
    return entry(past, "append" if names.GENERATIONS in h5.attrs else "as found", n)


def record_current(h5: h5py.File) -> None:
    """Record the committed state of an open, writable corpus file as a generation (when new)."""
    now = current(h5)
    if now != recorded(h5):
        h5.attrs[names.GENERATIONS] = json.dumps(now)


def folder(path) -> str:
    """Where the snapshots of corpus ``path`` are kept."""
    return os.path.abspath(str(path)) + SUFFIX


def snapshot_name(generation: int) -> str:
    return f"gen-{generation:06d}.h5"


def keep_snapshot(path, generation: int) -> str:
    """Keep the file now at ``path`` as the snapshot of ``generation`` (a hard link, or a copy
    where links are refused); returns its name inside :func:`folder`. Called just before the
    rewritten file replaces it: from then on nothing writes the kept file."""
    os.makedirs(folder(path), exist_ok=True)
    name = snapshot_name(generation)
    final = os.path.join(folder(path), name)
    tmp = names.temporary(final)
    try:
        os.link(path, tmp)
    except OSError:
        import shutil

        shutil.copyfile(path, tmp)
    os.replace(tmp, final)
    return name


def source(path, generations: list[dict], generation: int) -> tuple[str, int]:
    """The file whose first rows are ``generation``'s images, and their number."""
    numbers = [g["generation"] for g in generations]
    if generation not in numbers:
        known = f"{numbers[0]}..{numbers[-1]}" if numbers else "none recorded (a corpus of a version before 0.3.2)"
        raise StoreError(f"{path}: no generation {generation} (recorded: {known}; `spade-faiss info {path}` lists "
                         f"them)")
    at = numbers.index(generation)
    images = generations[at]["images"]
    for later in generations[at + 1:]:
        if later.get("before"):  # the first rewrite after it kept the file that held it
            kept = os.path.join(folder(path), later["before"])
            if not os.path.isfile(kept):
                raise StoreError(f"{path}: generation {generation} is kept in {kept}, which is missing (deleted?): "
                                 f"it cannot be restored")
            return kept, images
    return os.path.abspath(str(path)), images
