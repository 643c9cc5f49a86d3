"""Making a corpus writable again after its writer died (a crash, SIGKILL, power loss).

HDF5 keeps no journal: an append interrupted between its metadata writes can leave a file whose
committed rows read fine but whose next write fails ("bad heap index", "addr overflow"). A
writer therefore marks the file while it has it open; the next writer that finds the mark
rewrites the corpus from its committed rows under a temporary name and renames it over the old
one (the rows past ``n_committed`` were never part of the corpus anyway).
"""

from __future__ import annotations

import json
import logging
import os

import h5py

from ..config import upgrade_feature_dict
from ..representations import Representation, per_level
from .layout import write_layout

log = logging.getLogger(__name__)

COPY_ROWS = 64


def rebuild(path: str) -> int:
    """Rewrite the corpus at ``path`` from its committed rows; returns their number."""
    tmp = f"{path}.rebuild-{os.getpid()}"
    with h5py.File(path, "r") as src:
        n = int(src.attrs["n_committed"])
        config = upgrade_feature_dict(json.loads(src.attrs["config"]))
        levels, v2 = config["levels"], int(src.attrs["format_version"]) >= 2
        names = per_level(config["storage"], levels)
        attrs = {k: v for k, v in src.attrs.items() if k not in ("n_committed", "writer")}
        specs = {lv: (src["levels"][lv].shape[1:], src["levels"][lv].dtype,
                      Representation(names[lv], 1).filters() if v2 else {}) for lv in levels}
        with h5py.File(tmp, "w") as dst:
            write_layout(dst, attrs, specs, src["images/pool"].shape[1], n, checksums=v2)
            if "representations" in src:
                src.copy("representations", dst)
            for name in ["images/path", "images/sha256", "images/pool"] + [f"levels/{lv}" for lv in levels]:
                for start in range(0, n, COPY_ROWS):
                    stop = min(n, start + COPY_ROWS)
                    dst[name][start:stop] = src[name][start:stop]
            index = src["index"]
            if int(index.attrs.get("ntotal", n + 1)) <= n:  # saved after its rows: still valid
                if "faiss" in index:
                    dst["index"].create_dataset("faiss", data=index["faiss"][()])
                dst["index"].attrs.update(dict(index.attrs))
    os.replace(tmp, path)
    log.warning("%s: its last writer did not close it (a crash?): rewrote it from its %d committed images",
                path, n)
    return n
