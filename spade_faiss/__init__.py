"""spade_faiss: SPADE anomaly detection (Cohen & Hoshen 2020) over HDF5 corpora and faiss.

Scores are "higher = more anomalous" everywhere: image scores, pixel maps, thresholds.

The library core (this package's modules) answers one question per module; the applications
built on it (command line, HTTP service, Ray engine, evaluation, run files, pictures, reports,
integrity checks) live in :mod:`spade_faiss.apps` and reach the core through :class:`Spade`.
"""

from .backbone import FeatureExtractor, WeightsError  # noqa: E402
from .config import RunOptions, SpadeConfig  # noqa: E402
from .datasets import Sample, discover  # noqa: E402
from .detector import Spade, describe  # noqa: E402
from .image_index import ImageIndex  # noqa: E402
from .images import ImageError, LoadedImage  # noqa: E402
from .results import IndexReport, ScoredImage, SpadeResult  # noqa: E402
from .store import FeatureStore, StoreError  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = ["Spade", "SpadeResult", "ScoredImage", "IndexReport", "SpadeConfig", "RunOptions", "FeatureStore",
           "StoreError", "ImageIndex", "FeatureExtractor", "WeightsError", "ImageError", "LoadedImage", "Sample",
           "discover", "describe", "__version__"]
