"""spade_faiss: SPADE anomaly detection (Cohen & Hoshen 2020) over HDF5 corpora and faiss.

Scores are "higher = more anomalous" everywhere: image scores, pixel maps, thresholds.
"""

__version__ = "0.1.0"
