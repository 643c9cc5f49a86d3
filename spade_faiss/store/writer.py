"""AppendWriter: appends batches to a corpus on a background thread, so that feature
extraction goes on while HDF5 writes."""

from __future__ import annotations

import queue
import threading

from .corpus import FeatureStore


class AppendWriter:
    """Appends batches to a store on a background thread, in order, so that feature extraction
    goes on while HDF5 writes; an error in the writer is raised in the caller."""

    def __init__(self, store: FeatureStore):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="spade-append", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def _run(self):
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.store.append(*item)
                except BaseException as e:  # re-raised in the caller's thread
                    self.error = e

    def put(self, paths, sha256s, feats):
        if self.error is not None:
            raise self.error
        self.queue.put((paths, sha256s, feats))

    def __exit__(self, *exc):
        self.queue.put(None)
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error
