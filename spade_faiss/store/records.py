"""What a corpus file records about its images beside their rows: the image index (its blob or
the sidecar's name, ``image_index.py`` owns their meaning), the calibrated thresholds, the
leave-one-out pixel threshold (``detector/thresholds.py``) and the pruned engine's projections
(``detector/pipeline.py``). Each is replaced whole and flushed; the names are ``names.py``'s.
"""

from __future__ import annotations

import json

import h5py
import numpy as np

from . import errors, names
from .appends import check_thresholds
from .errors import StoreError


class Records:
    """The records of one open corpus file (``FeatureStore.records``)."""

    def __init__(self, h5: h5py.File, path: str):
        self.h5, self.path = h5, path

    def _read(self, name: str, selection):
        return errors.read(self.h5, self.path, name, selection)

    # --- the image index ---------------------------------------------------------------------

    def write_index(self, blob: np.ndarray | None, attrs: dict) -> None:
        """Replace the stored index: ``blob`` (uint8 bytes) or None when it lives in a sidecar."""
        grp = self.h5[names.INDEX]
        if "faiss" in grp:
            del grp["faiss"]
        if blob is not None:  # checksummed (format v2), so damage is an error on load, not other scores
            checks = {"chunks": True, "fletcher32": True} if int(self.h5.attrs[names.FORMAT_VERSION]) >= 2 else {}
            grp.create_dataset("faiss", data=blob, **checks)
        for k in list(grp.attrs):
            del grp.attrs[k]
        grp.attrs.update(attrs)
        self.h5.flush()

    def read_index(self) -> tuple[np.ndarray | None, dict]:
        grp = self.h5[names.INDEX]
        blob = self._read(names.INDEX_BLOB, ()) if "faiss" in grp else None
        return blob, dict(grp.attrs)

    def sidecar_path(self) -> str:
        """Where the image index's sidecar file of this corpus lives."""
        return names.sidecar(self.path)

    # --- thresholds ----------------------------------------------------------------------------

    def write_thresholds(self, thresholds: dict) -> None:
        """Store calibrated thresholds (JSON in the ``thresholds`` attribute)."""
        self.h5.attrs[names.THRESHOLDS] = json.dumps(thresholds, sort_keys=True)
        self.h5.flush()

    def thresholds(self) -> dict | None:
        if names.THRESHOLDS not in self.h5.attrs:
            return None
        where = f"{self.path}: the {names.THRESHOLDS} attribute"
        try:
            record = json.loads(self.h5.attrs[names.THRESHOLDS])
        except ValueError as e:
            raise StoreError(f"{where} is not a thresholds record ({e})") from None
        return check_thresholds(record, where)

    def write_leave_one_out_theta(self, record: dict) -> None:
        """Store the leave-one-out pixel threshold with what it was computed for (JSON attribute)."""
        self.h5.attrs[names.LEAVE_ONE_OUT_THETA] = json.dumps(record, sort_keys=True)
        self.h5.flush()

    def leave_one_out_theta(self) -> dict | None:
        attrs = self.h5.attrs
        return json.loads(attrs[names.LEAVE_ONE_OUT_THETA]) if names.LEAVE_ONE_OUT_THETA in attrs else None

    # --- the pruned engine's projections -------------------------------------------------------

    def write_projection(self, name: str, mean: np.ndarray, basis: np.ndarray) -> None:
        """Store the basis of level (or ``concat``) ``name`` (replaced, checksummed)."""
        group = names.projection(name)
        if group in self.h5:
            del self.h5[group]
        g = self.h5.create_group(group)
        for key, value in (("mean", mean), ("basis", basis)):
            g.create_dataset(key, data=value, chunks=True, fletcher32=True)
        self.h5.flush()

    def projection(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The stored ``(mean, basis)`` of level (or ``concat``) ``name``, or None."""
        group = names.projection(name)
        if group not in self.h5:
            return None
        return self._read(f"{group}/mean", ()), self._read(f"{group}/basis", ())
