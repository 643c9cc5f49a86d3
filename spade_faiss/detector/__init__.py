"""The detector: the one composer of the library core.

- ``spade``: :class:`Spade`, the public API (parameters, corpus, indexing, thresholds, scoring)
- ``indexing``: :func:`append_new`, new images into the corpus
- ``pipeline``: :class:`QueryPipeline`, the two stages of a query over an attached corpus
- ``thresholds``: calibration, overrides and the calibration-free estimate of the thresholds
"""

from .pipeline import QueryPipeline
from .spade import Spade, convert, describe, join

__all__ = ["Spade", "QueryPipeline", "convert", "describe", "join"]
