"""The corpus file, format v1 (SPEC 2): this package is the only reader and writer of it.

- ``corpus``: :class:`FeatureStore`, one open corpus (creation, reads, crash-safe appends)
- ``writer``: :class:`AppendWriter`, appends on a background thread
- ``shards``: :func:`join_shards`, one corpus over several shard files
- ``repair``: :func:`rebuild`, a corpus whose writer died made writable again
"""

from .corpus import SHA_DTYPE, FeatureStore, StoreError
from .shards import join_shards
from .writer import AppendWriter

__all__ = ["FeatureStore", "StoreError", "AppendWriter", "join_shards", "SHA_DTYPE"]
