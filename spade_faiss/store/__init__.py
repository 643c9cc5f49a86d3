"""The corpus file, format v2 (v1 read and migrated): this package is the only reader and writer of it.

- ``corpus``: :class:`FeatureStore`, one open corpus (creation, reads, crash-safe appends)
- ``layout``: the datasets of a corpus file, for every writer
- ``writer``: :class:`AppendWriter`, appends on a background thread
- ``shards``: :func:`join_shards`, one corpus over several shard files
- ``repair``: :func:`rebuild`, a corpus whose writer died made writable again
- ``convert``: :func:`convert`, a corpus in another stored representation (v1 -> v2 too)
- ``appends``: the segments a corpus grows by while other processes read it
- ``view``: :class:`CorpusView`, a corpus and its segments as one; :func:`open_corpus`
- ``removal``: :func:`remove_rows` and :func:`roll_back` (rewrites by the one writer)
- ``generations``: the record of a corpus file's generations and their snapshots
"""

from .convert import convert
from .corpus import CorpusLocked, FeatureStore, StoreError
from .layout import SHA_DTYPE
from .removal import remove_rows, resolve, roll_back
from .shards import join_shards
from .view import CorpusView, merge_segments, open_corpus
from .writer import AppendWriter

__all__ = ["remove_rows", "resolve", "roll_back",
           "AppendWriter", "CorpusLocked", "CorpusView", "FeatureStore", "SHA_DTYPE", "StoreError", "convert",
           "join_shards", "merge_segments", "open_corpus"]
