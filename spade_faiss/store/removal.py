"""Removing normal images from a corpus (a defective image found among the normals is the most
common way a corpus goes wrong in production).

The corpus is rewritten without those rows by the one writer that has it to itself (segments
merged first), under a temporary name and renamed (``repair.rewrite``): a kill leaves the old
corpus or the new one, never half of either. Ids after a removed row shift down; the image index
is rebuilt by the caller (``Spade.reindex``). The thresholds calibrated before stay and are
reported as possibly stale (images whose neighbours included a removed image now score higher).
"""

from __future__ import annotations

import os

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
    """Rewrite corpus ``path`` without ``rows`` (nobody may have it open); returns the images left."""
    return rewrite(path, drop=rows)
