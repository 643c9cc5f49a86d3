"""The spill: where the gallery cache puts the entries its memory bound evicts, so that a later
miss reads them back instead of reading and preparing them again.

A gallery miss costs a read of the corpus (Blosc2 decompression and the rows' sha256 digests,
with HDF5 holding the interpreter) and the pruned engine's preparation (the float64
projection): ~15-20 ms per image on the user's run, where ~20 of each query's 50 images miss
(eighteenth wave). A prepared entry written to a file and read back is a copy: its arrays are
written once, as they are, and read back with one ``preadv`` (the interpreter is let go).

The file is this process's own: created in the temporary folder (``TMPDIR``) and unlinked at
once, so nothing is left behind by a crash and no other process can see or change it; what is
read back is what this process wrote, as from memory (a forked child sees none of it: it would
write over its parent's entries). The operating system's page cache holds
it while memory is free (none of it is this process's resident set; the kernel writes it out
and drops it under pressure, and a read then costs a disk read). Not on a memory file system
(tmpfs, ramfs: there the file would be memory that cannot be reclaimed); at most ``max_bytes``
and a quarter of the folder's free space when the spill is created, and no write that would
leave the file system less than ``KEEP_FREE_BYTES`` free (the spills of a service's corpora and
whatever else writes there share the disk). An entry that does not fit is dropped as before; an
error of the file stops the spill (a warning, once).

An entry is any structure of dicts, tuples and dataclasses whose arrays are numpy arrays or
torch tensors (``PreparedImage``, ``DenseImage``, plain arrays): it is pickled with its arrays
left out (``persistent_id``), and they are written after it, each from an offset aligned to
64 bytes.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
import tempfile
import weakref
from collections.abc import Hashable

import numpy as np
import torch

from .memory import GIB

log = logging.getLogger(__name__)

ALIGN = 64
FREE_SHARE = 0.25  # at most this share of the folder's free space when the spill starts
# and never a write that leaves the file system with less free than this (several spills, one per
# attached corpus of a service, and whatever else writes there, share the disk)
KEEP_FREE_BYTES = 2 * GIB
MEMORY_FILE_SYSTEMS = {"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"}


def _aligned(nbytes: int) -> int:
    """The bytes an array of ``nbytes`` takes in the file: up to the next multiple of ``ALIGN``."""
    return -(-nbytes // ALIGN) * ALIGN


def file_system(path: str) -> str | None:
    """The file system type of the mount that holds ``path`` (``/proc/mounts``; None elsewhere)."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) > 2]
    except OSError:
        return None
    real = os.path.realpath(path)
    best = max((m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else None


class _Writer(pickle.Pickler):
    def __init__(self, buffer, arrays: list):
        super().__init__(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        self.arrays = arrays

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.layout == torch.strided:
            t = obj.detach().contiguous()
            self.arrays.append(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8))
            return ("torch", len(self.arrays) - 1, t.dtype, tuple(t.shape))
        if isinstance(obj, np.ndarray) and obj.dtype.kind in "biufc":
            a = np.ascontiguousarray(obj)
            self.arrays.append(a.reshape(-1).view(np.uint8))
            return ("numpy", len(self.arrays) - 1, a.dtype.str, a.shape)
        return None


class _Reader(pickle.Unpickler):
    def __init__(self, buffer, arrays: list):
        super().__init__(buffer)
        self.arrays = arrays

    def persistent_load(self, pid):
        kind, i, dtype, shape = pid
        raw = self.arrays[i]
        if kind == "torch":
            return torch.from_numpy(raw).view(dtype).reshape(shape) if len(raw) else torch.empty(shape, dtype=dtype)
        return raw.view(np.dtype(dtype)).reshape(shape)


class Spill:
    """Entries written once to a private file and read back on demand.

    Parameters
    ----------
    max_bytes : int
        The file's bound (it is also kept under a quarter of the folder's free space).
    folder : str, optional
        Where the file is made (default: the temporary folder).
    """

    def __init__(self, max_bytes: int, folder: str | None = None):
        self.folder = folder or tempfile.gettempdir()
        self.max_bytes = int(max_bytes)
        self._fd: int | None = None
        self._where: dict[Hashable, tuple[int, bytes, list[int]]] = {}  # key -> (offset, skeleton, array sizes)
        self.size = 0
        self.reads = 0
        self.writes = 0
        self.off = self.max_bytes <= 0
        self.why_off: str | None = None
        self._pid = os.getpid()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._where and self._pid == os.getpid()  # a forked child has none: the file is its parent's

    def __len__(self) -> int:
        return len(self._where)

    def _open(self) -> bool:
        if self._fd is not None:
            return True
        kind = file_system(self.folder)
        if kind in MEMORY_FILE_SYSTEMS:
            return self.stop(f"{self.folder} is a memory file system ({kind})")
        try:
            free = shutil.disk_usage(self.folder).free
            self.max_bytes = min(self.max_bytes, int(free * FREE_SHARE))
            fd, name = tempfile.mkstemp(prefix="spade-faiss-spill-", dir=self.folder)
            os.unlink(name)  # private, and gone with the process
        except OSError as e:
            return self.stop(f"{self.folder}: {e}")
        self._fd = fd
        self._closer = weakref.finalize(self, os.close, fd)  # the file goes with the spill
        return True

    def _room_for(self, nbytes: int) -> bool:
        """Whether writing ``nbytes`` leaves the file system ``KEEP_FREE_BYTES`` free (a full
        spill is one that cannot grow: what does not fit is dropped, no warning)."""
        try:
            return shutil.disk_usage(self.folder).free - nbytes >= KEEP_FREE_BYTES
        except OSError:
            return False

    def stop(self, why: str) -> bool:
        """Spill no more (the file closed, what it held forgotten), with a warning saying why."""
        self.off, self.why_off = True, why
        log.warning("gallery entries the memory budget evicts are dropped, not spilled to disk: %s", why)
        self.close()
        return False

    def put(self, key: Hashable, value) -> bool:
        """Write ``value`` once (a key already there is kept); False when it was not written."""
        if self._pid != os.getpid():  # a forked child writes nothing into its parent's file
            return False
        if self.off or key in self._where:
            return key in self._where
        arrays: list[np.ndarray] = []
        skeleton = io.BytesIO()
        _Writer(skeleton, arrays).dump(value)
        sizes = [a.nbytes for a in arrays]
        total = sum(_aligned(n) for n in sizes)
        if self.size + total > self.max_bytes or not self._open() or not self._room_for(total):
            return False
        views, pad = [], bytes(ALIGN)
        for a, n in zip(arrays, sizes):
            views.append(memoryview(a))
            if _aligned(n) > n:
                views.append(pad[: _aligned(n) - n])
        try:
            written = os.pwritev(self._fd, views, self.size) if views else 0
            if written != total:
                raise OSError(f"wrote {written} of {total} bytes")
        except OSError as e:  # a full disk, a write error: spill no more, drop this one
            self.stop(f"{self.folder}: {e}")
            return False
        self._where[key] = (self.size, skeleton.getvalue(), sizes)
        self.size += total
        self.writes += 1
        return True

    def get(self, key: Hashable):
        """The value written under ``key`` (a ``KeyError`` when there is none): one read into
        one buffer, whose aligned parts are the value's arrays."""
        offset, skeleton, sizes = self._where[key]
        total = sum(_aligned(n) for n in sizes)
        buffer = np.empty(total, np.uint8)
        read = os.preadv(self._fd, [memoryview(buffer)], offset) if total else 0
        if read != total:
            raise OSError(f"the spill file returned {read} of {total} bytes")
        arrays, at = [], 0
        for n in sizes:
            arrays.append(buffer[at:at + n])
            at += _aligned(n)
        self.reads += 1
        return _Reader(io.BytesIO(skeleton), arrays).load()

    def close(self) -> None:
        """Close (and so delete) the file; the spill is empty."""
        if self._fd is not None:
            self._closer()
            self._fd = None
        self._where.clear()
        self.size = 0
