"""Removing normal images from a corpus (a defective image found among the normals is the most
common way a corpus goes wrong in production), and rolling a corpus back to a generation.

The corpus is rewritten without those rows by the one writer that has it to itself (segments
merged first), under a temporary name and renamed (``repair.rewrite``): a kill leaves the old
corpus or the new one, never half of either. Ids after a removed row shift down; the image index
is rebuilt by the caller (``Spade.reindex``). The thresholds calibrated before stay and are
reported as possibly stale (images whose neighbours included a removed image now score higher).
"""

from __future__ import annotations

import os

import h5py

from . import generations
from .repair import rewrite

SHA256_HEX = 64


def resolve(targets: list[str], paths: list[str], sha256s: list[str]) -> tuple[list[int], list[str]]:
    """Rows of the corpus named by ``targets`` (a path as indexed, absolute or relative to the
    current folder, or a sha256 in hex) and the targets found nowhere."""
    by_path = {p: i for i, p in enumerate(paths)}
    by_sha = {s: i for i, s in enumerate(sha256s)}
    rows, unknown = [], []
    for t in targets:
        t = str(t)
        if len(t) == SHA256_HEX and all(c in "0123456789abcdef" for c in t.lower()) and t.lower() in by_sha:
            rows.append(by_sha[t.lower()])
        elif t in by_path or os.path.abspath(t) in by_path:
            rows.append(by_path.get(t, by_path.get(os.path.abspath(t))))
        else:
            unknown.append(t)
    return sorted(set(rows)), unknown


def remove_rows(path: str, rows: list[int]) -> int:
    """Rewrite corpus ``path`` without ``rows`` (nobody may have it open); returns the images
    left. The rewrite is a generation: the file before it is kept (``generations.py``)."""
    return rewrite(path, drop=rows, change=f"remove {len(rows)}")


def roll_back(path: str, generation: int) -> dict:
    """Rewrite corpus ``path`` as it was at ``generation`` (nobody may have it open), itself a
    new generation; returns ``{"generation", "images", "restored"}``. The image index is left
    out (the caller rebuilds it)."""
    with h5py.File(path, "r") as h:
        past = generations.current(h)
    source, images = generations.source(path, past, generation)
    kept = rewrite(path, source=None if source == os.path.abspath(path) else source, stop=images,
                   change=f"rollback to {generation}")
    return {"generation": past[-1]["generation"] + 1, "images": kept, "restored": generation}
