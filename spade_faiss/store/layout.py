"""The datasets of a corpus file (format v2): created here for new, rebuilt, converted and
joined corpora alike. h5py and numpy only."""

from __future__ import annotations

import h5py
import numpy as np

from ..representations import Representation
from . import names

SHA_DTYPE = "S64"
POOL_CHUNK_ROWS = 256
STRING_CHUNK_ROWS = 1024


DIGEST_BYTES = 32


def write_layout(h5: h5py.File, attrs: dict, levels: dict, pool_dim: int, n: int = 0, digests: bool = True) -> None:
    """The attributes and the (empty, resizable) datasets of a corpus, ``n`` rows long.

    ``levels``: per level, ``(stored shape (h, w, c), stored dtype, h5py filter keywords)`` or an
    ``h5py.VirtualLayout`` (a joined corpus: rows live in shard files). ``digests``: the per-image
    sha256 of each part's stored bytes (``digests/pool``, ``digests/names``, ``digests/<level>``;
    ``store/digests.py``).

    No chunk checksum (fletcher32) on a dataset whose chunks hold many images' rows (paths,
    sha256, pool, digests): each append rewrites such a chunk in place, committed rows included,
    and a process killed during that write (the kernel stops a write between pages on SIGKILL)
    leaves a chunk whose committed bytes are intact but whose checksum no longer matches, so the
    committed images could not be read. The per-image digests cover those bytes instead (a torn
    write leaves every committed row's bytes, and so its digest, as they were). A level row is a
    chunk of its own, written once: its filters (``representations.py``) keep fletcher32."""
    h5.attrs.update(attrs)
    h5.attrs[names.N_COMMITTED] = n
    h5.create_group(names.IMAGES)
    h5.create_dataset(names.PATHS, (n,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"),
                      chunks=(STRING_CHUNK_ROWS,))
    h5.create_dataset(names.SHA256, (n,), maxshape=(None,), dtype=SHA_DTYPE, chunks=(STRING_CHUNK_ROWS,))
    h5.create_dataset(names.POOL, (n, pool_dim), maxshape=(None, pool_dim), dtype=np.float32,
                       chunks=(POOL_CHUNK_ROWS, pool_dim))
    group = h5.create_group(names.LEVELS)
    for name, spec in levels.items():
        if isinstance(spec, h5py.VirtualLayout):
            group.create_virtual_dataset(name, spec, fillvalue=0)
        else:
            shape, dtype, filters = spec
            group.create_dataset(name, (n, *shape), maxshape=(None, *shape), dtype=dtype, chunks=(1, *shape),
                                 **filters)
    h5.create_group(names.INDEX)
    if digests:
        for part in names.digest_parts(levels):
            h5.create_dataset(names.digest(part), (n, DIGEST_BYTES), maxshape=(None, DIGEST_BYTES), dtype=np.uint8,
                              chunks=(STRING_CHUNK_ROWS, DIGEST_BYTES))


def level_specs(representations: dict[str, Representation], feature_shapes: dict) -> dict:
    """:func:`write_layout`'s level specs of these representations."""
    return {lv: ((*feature_shapes[lv][:2], r.stored_channels), r.stored_dtype, r.filters())
            for lv, r in representations.items()}


def write_representations(h5: h5py.File, representations: dict[str, Representation]) -> None:
    """The fitted arrays of the pca representations under ``representations/<level>``."""
    group = h5.require_group(names.REPRESENTATIONS)
    for lv, r in representations.items():
        if r.state is not None and lv not in group:
            sub = group.create_group(lv)
            for key, value in r.state.items():
                sub.create_dataset(key, data=value, fletcher32=True)
