"""How a corpus file fails: its two errors, and the checked read that names the file and the
dataset when a chunk cannot be read."""

from __future__ import annotations

import h5py


class StoreError(ValueError):
    """A corpus file that is missing parts, corrupt, or built with another configuration."""


class CorpusLocked(StoreError):
    """The corpus file is open in another process in a way that excludes this open (HDF5's
    file lock: one writer excludes everyone, readers share)."""


def damaged(path: str, name: str, where: str, error: Exception) -> StoreError:
    """The error of a part of ``path`` that cannot be read."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return StoreError(f"{path}: {name}{' ' + where if where else ''} cannot be read ({text}): the file is "
                      f"damaged; `spade-faiss verify --deep {path}` lists what")


def read(h5: h5py.File, path: str, name: str, selection):
    """``h5[name][selection]``; a failed read (a checksum, a damaged chunk) names the dataset
    and the file."""
    try:
        return h5[name][selection]
    except (OSError, KeyError) as e:
        raise damaged(path, name, "", e) from None
