"""The detector: the one composer of the library core.

- ``spade``: :class:`Spade`, the public API: it keeps the parameters and the model, and
  delegates to the attached corpus and the functions below
- ``attached``: :class:`AttachedCorpus`, the corpus a Spade answers from as one value
  (view, image index, query pipeline, paths, thresholds), built by :func:`attach`
- ``indexing``: a new corpus, new images into it and the image index brought up to them
- ``pipeline``: :class:`QueryPipeline`, the two stages of a query over an attached corpus
- ``thresholds``: calibration (with its diagnostics) and the calibration-free colour scale
"""

from ..store.names import held_out_list
from .attached import AttachedCorpus
from .pipeline import QueryPipeline
from .spade import Spade, convert, describe, join

__all__ = ["AttachedCorpus", "Spade", "QueryPipeline", "convert", "describe", "held_out_list", "join"]
