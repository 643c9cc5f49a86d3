"""Every name a corpus occupies: the datasets, groups and attributes inside its file, and the
files beside it (the image index's sidecar, the segments folder and what it holds).

The store package and the layers above ask this module for a name; none spells one itself
(``tests/test_store.py`` checks that the literals live here only).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# --- inside the file: datasets and groups -------------------------------------------------
IMAGES = "images"
PATHS = "images/path"
SHA256 = "images/sha256"
POOL = "images/pool"
LEVELS = "levels"
REPRESENTATIONS = "representations"
INDEX = "index"
INDEX_BLOB = "index/faiss"
PROJECTIONS = "projections"
DIGESTS = "digests"
POOL_PART = "pool"  # the pooled vectors' digests are digests/pool, a level's digests/<level>
NAMES_PART = "names"  # digests/names: each image's path and sha256 (``store/digests.py``; since 0.3.2)

# --- inside the file: attributes of the root --------------------------------------------------
FORMAT_VERSION = "format_version"
LIBRARY_VERSION = "library_version"
CREATED = "created"
CONFIG = "config"
WEIGHTS_SOURCE = "weights_source"
FEATURE_SHAPES = "feature_shapes"
N_COMMITTED = "n_committed"
WRITER = "writer"
THRESHOLDS = "thresholds"
LEAVE_ONE_OUT_THETA = "leave_one_out_theta"
GENERATIONS = "generations"  # JSON list of the file's generations (``generations.py``; since 0.3.2)
CORPUS_ID = "corpus_id"  # a random id written at creation (a segment has its own too)
SEGMENT_OF = "segment_of"  # a segment's: the corpus_id of the corpus it extends
SEGMENT_NUMBER = "segment_number"  # a segment's: its number in that corpus's sequence
BASE_ROWS = "base_rows"  # a segment's: the corpus file's committed rows when it was written
WRITTEN_AT = "written_at"  # the file's real path when its last writer closed it (finds a `.appends/` left behind)

# --- beside the file --------------------------------------------------------------------------
APPENDS_SUFFIX = ".appends"
THRESHOLDS_FILE = "thresholds.json"
REMOVED_FILE = "removed.json"  # images removed while the corpus was read: excluded until compacted
WRITER_LOCK = ".writer.lock"
SEGMENT = re.compile(r"^seg-(\d{6})\.h5$")
SIDECAR_SUFFIX = ".faiss"
HELD_OUT_SUFFIX = ".held_out.txt"
QUARANTINED = ".quarantined"  # a refused segment renamed by `verify --repair` (no longer a segment's name)
ORPHANED = ".orphaned-"  # a segments folder found beside a new corpus (its own was deleted) is renamed so


def digest_parts(levels) -> tuple[str, ...]:
    """The parts of a corpus whose rows carry per-image digests (``digests/<part>``)."""
    return (POOL_PART, NAMES_PART, *levels)


def level(name: str) -> str:
    """The dataset of level ``name``'s stored rows."""
    return f"{LEVELS}/{name}"


def digest(part: str) -> str:
    """The dataset of the per-image sha256 digests of a part's stored bytes (``POOL_PART`` or a level)."""
    return f"{DIGESTS}/{part}"


def representation(level_name: str, key: str | None = None) -> str:
    """The group (or, with ``key``, the dataset) of a level's fitted representation."""
    return f"{REPRESENTATIONS}/{level_name}" + (f"/{key}" if key else "")


def projection(name: str) -> str:
    """The group of the pruned engine's basis of a level (or ``concat``)."""
    return f"{PROJECTIONS}/{name}"


def sidecar(corpus_path) -> str:
    """The path of the image index's sidecar file of corpus ``corpus_path`` (beside it)."""
    stem = os.path.splitext(os.path.basename(str(corpus_path)))[0]
    return os.path.join(os.path.dirname(os.path.abspath(str(corpus_path))), stem + SIDECAR_SUFFIX)


def held_out_list(corpus_path) -> str:
    """The list of normal images `index --hold-out` set aside for calibration (beside the corpus)."""
    stem, _ = os.path.splitext(str(corpus_path))
    return stem + HELD_OUT_SUFFIX


def appends_dir(corpus_path) -> Path:
    """The folder of segments and thresholds committed beside corpus ``corpus_path``, found
    through its real path: every name of one corpus file (a symlink, a relative path) shares
    one folder and one writer lock."""
    return Path(f"{os.path.realpath(str(corpus_path))}{APPENDS_SUFFIX}")


def segment_name(number: int) -> str:
    return f"seg-{number:06d}.h5"


def segment_number(path) -> int | None:
    """The number in a segment's file name (None: not a segment's name)."""
    m = SEGMENT.match(os.path.basename(str(path)))
    return int(m.group(1)) if m else None


def quarantined(segment_path) -> str:
    """Where `verify --repair` puts a segment readers refuse (kept, never read)."""
    return f"{segment_path}{QUARANTINED}"


def orphaned(folder: Path, stamp: str) -> Path:
    """Where a segments folder that belongs to no corpus is set aside."""
    return folder.with_name(folder.name + ORPHANED + stamp)


def temporary(path) -> str:
    """The name a file is written under before it is renamed into ``path`` (this process's)."""
    return f"{path}{TEMPORARY}{os.getpid()}"


TEMPORARY = ".tmp-"


def final_name(path) -> str:
    """The name a temporary file (:func:`temporary`) is renamed into; other names as they are."""
    head, sep, pid = str(path).rpartition(TEMPORARY)
    return head if sep and pid.isdigit() else str(path)


def abandoned_temporaries(path) -> list[str]:
    """Temporaries of ``path`` whose writer is gone (its process no longer exists): what a killed
    ``index``, ``convert`` or append left; nobody reads them."""
    folder, base = os.path.split(os.path.abspath(str(path)))
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        pid = name[len(base) + len(TEMPORARY):] if name.startswith(base + TEMPORARY) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            found.append(os.path.join(folder, name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
