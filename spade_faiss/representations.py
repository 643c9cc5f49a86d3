"""How each feature level is stored in a corpus and searched (docs/design.md, "Stored
representations"). numpy only: the store uses it; torch is imported only to encode queries.

A representation has a *search space*: the vectors that stage 2 compares. Its contract is that
squared L2 in the search space equals squared L2 between the query's features and the *decoded*
stored features (in real arithmetic), and stage 2 computes it exactly there:

- ``float16``, ``float32``: the features as stored; search space = feature space.
- ``float16+zstd``, ``float32+zstd``: the same values, stored with a lossless HDF5 filter
  (Blosc2 zstd, byte shuffle; ``hdf5plugin``): identical maps, fewer bytes, slower reads.
- ``pca<d>``: the level's top ``d`` principal directions ``V`` and mean ``mu``, fitted on the
  corpus (a seeded sample of its first images) and stored in it; each location is stored as
  int8 codes ``k`` of its coordinates ``V^T (x - mu)`` with a per-direction step ``s`` and a
  per-location exponent ``e >= 0`` (one more int8 channel, since 0.3.2): the smallest with
  every ``|k| <= 127``, so no coordinate is ever clipped. The decoded feature is
  ``g = mu + V (s k 2^e)``. (The steps are fitted on the first images; before the exponent, a
  later location with a larger coordinate was clipped to 127 steps and decoded far from its
  feature: on magnetic_tile 1-6% of the locations of 60% of the images, which made compact's
  outlying map maxima: up to 91x the float16 corpus's on the 583 test images against 685
  normals, 4.5x with the exponent. Files without the exponent channel are read as before.) Because ``V`` is orthonormal,
  ``||q - g||^2 = ||V^T (q - mu) - s k||^2 + ||(I - V V^T)(q - mu)||^2``, so the search space
  has ``d + 1`` dimensions: a gallery row is ``[s k 2^e, 0]`` and a query row is
  ``[V^T (q - mu), ||(I - V V^T)(q - mu)||]``; the query's distance to the subspace of normal
  features stays in every distance (an anomaly far from that subspace stays far).
- ``compact``: a preset, ``pca64`` / ``pca96`` / ``pca128`` for layer1 / layer2 / layer3.

Bilinear upsampling (``pixel_mode="concat"``) commutes with the affine decoding, so the concat
gallery is the upsampled search-space rows; a concat query is upsampled in feature space first
and then encoded level by level.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

RAW = ("float16", "float32")
LOSSLESS_SUFFIX = "+zstd"
PRESETS = {"compact": {"layer1": "pca64", "layer2": "pca96", "layer3": "pca128"}}
_PCA = re.compile(r"pca([1-9][0-9]*)$")
CODE_MAX = 127  # int8 codes lie in [-127, 127]
FIT_IMAGES = 16  # images whose features fit a pca representation (the first ones added)
FIT_VECTORS = 65536  # at most this many of their vectors (a seeded sample)
NAMES_HELP = "float16, float32, float16+zstd, float32+zstd, pca<d>, compact, or LEVEL=NAME,..."


def _check_name(name: str, level: str | None = None) -> None:
    ok = name in RAW or (name.endswith(LOSSLESS_SUFFIX) and name[:-len(LOSSLESS_SUFFIX)] in RAW) or \
        bool(_PCA.match(name))
    if not ok:
        where = f" for {level}" if level else ""
        raise ValueError(f"storage {name!r}{where}: expected one of {NAMES_HELP}")


def per_level(storage: str, levels) -> dict[str, str]:
    """``storage`` (one name, a preset, or ``LEVEL=NAME,...``) as a name per level."""
    if not isinstance(storage, str) or not storage:
        raise ValueError(f"storage={storage!r}: expected one of {NAMES_HELP}")
    if storage in PRESETS:
        other = [lv for lv in levels if lv not in PRESETS[storage]]
        if other:
            raise ValueError(f"storage={storage!r} names a representation for {list(PRESETS[storage])} only, not "
                             f"{other}: name one per level instead (e.g. pca128, or LEVEL=NAME,...)")
        return {lv: PRESETS[storage][lv] for lv in levels}
    if "=" not in storage:
        _check_name(storage)
        return {lv: storage for lv in levels}
    named = {}
    for part in storage.split(","):
        level, _, name = part.partition("=")
        if level not in levels or level in named:
            raise ValueError(f"storage={storage!r}: {level!r} is not a level of {list(levels)} (or is named twice)")
        _check_name(name, level)
        named[level] = name
    missing = [lv for lv in levels if lv not in named]
    if missing:
        raise ValueError(f"storage={storage!r}: no representation for {missing}")
    return named


def is_fitted(name: str) -> bool:
    """Whether representation ``name`` is fitted on the corpus (pca) before rows are written."""
    return bool(_PCA.match(name))


def canonical(storage: str, levels) -> str:
    """One spelling per choice: a single name when every level has it, else ``LEVEL=NAME,...``."""
    named = per_level(storage, levels)
    names = set(named.values())
    return names.pop() if len(names) == 1 else ",".join(f"{lv}={named[lv]}" for lv in levels)


def check_storage(name: str, value) -> None:
    """Any spelling :func:`per_level` accepts (for the full pyramid; the levels are checked later)."""
    if isinstance(value, str) and "=" in value:
        levels = [part.partition("=")[0] for part in value.split(",")]
        per_level(value, sorted(levels))
    else:
        per_level(value, ("layer1",))


@dataclasses.dataclass
class Representation:
    """One level's stored representation; ``state`` holds a pca representation's fitted arrays
    (``mean`` (C,) float64, ``basis`` (C, d) float64, ``step`` (d,) float32)."""

    name: str
    channels: int  # C of the features
    state: dict | None = None
    exponent: bool = True  # pca: a per-location exponent channel (False: a file of 0.3.1 or before)

    @property
    def dims(self) -> int | None:
        m = _PCA.match(self.name)
        return min(int(m.group(1)), self.channels) if m else None

    @property
    def is_pca(self) -> bool:
        return self.dims is not None

    @property
    def needs_fit(self) -> bool:
        return self.is_pca and self.state is None

    @property
    def stored_dtype(self) -> np.dtype:
        return np.dtype(np.int8) if self.is_pca else np.dtype(self.name.removesuffix(LOSSLESS_SUFFIX))

    @property
    def stored_channels(self) -> int:
        return self.dims + int(self.exponent) if self.is_pca else self.channels

    @property
    def search_channels(self) -> int:
        return self.dims + 1 if self.is_pca else self.channels

    def filters(self) -> dict:
        """h5py dataset keywords: a checksum on every chunk, and the lossless filter if any."""
        kw = {"fletcher32": True}
        if self.name.endswith(LOSSLESS_SUFFIX):
            import hdf5plugin

            kw.update(hdf5plugin.Blosc2(cname="zstd", clevel=1, filters=hdf5plugin.Blosc2.SHUFFLE))
        return kw

    # --- fitting (pca only) ----------------------------------------------------------------

    def fit(self, sample: np.ndarray, seed: int) -> None:
        """Principal directions and code steps from feature vectors ``sample`` (n, C)."""
        x = np.asarray(sample, dtype=np.float64).reshape(-1, self.channels)
        if len(x) > FIT_VECTORS:
            x = x[np.random.default_rng(seed).choice(len(x), FIT_VECTORS, replace=False)]
        mean = x.mean(axis=0)
        xc = x - mean
        _, vectors = np.linalg.eigh(xc.T @ xc)  # ascending eigenvalues
        basis = np.ascontiguousarray(vectors[:, ::-1][:, : self.dims])
        coords = xc @ basis
        top = np.abs(coords).max(axis=0)
        step = np.where(top > 0, top / CODE_MAX, 1.0).astype(np.float32)
        self.state = {"mean": mean, "basis": basis, "step": step}

    # --- gallery side ------------------------------------------------------------------------

    def encode(self, feats: np.ndarray) -> np.ndarray:
        """Features (n, h, w, C) -> what is stored (n, h, w, stored_channels)."""
        if not self.is_pca:
            return np.asarray(feats).astype(self.stored_dtype, copy=False)
        s = self.state
        coords = (np.asarray(feats, dtype=np.float64) - s["mean"]) @ s["basis"]
        if not self.exponent:
            return np.clip(np.rint(coords / s["step"]), -CODE_MAX, CODE_MAX).astype(np.int8)
        units = coords / s["step"]
        top = np.abs(units).max(axis=-1)
        _, e = np.frexp(top / (CODE_MAX + 0.5))  # the smallest e with top / 2^e < 127.5: rounds to |k| <= 127
        e = np.maximum(e, 0)  # no finer than the fitted step
        k = np.rint(np.ldexp(units, -e[..., None]))
        return np.concatenate([k, e[..., None]], axis=-1).astype(np.int8)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Stored rows (n, h, w, stored_channels) -> search-space rows (float16/float32 as
        stored for the float representations; float32 ``[s k, 0]`` for pca)."""
        if not self.is_pca:
            return stored
        out = np.zeros((*stored.shape[:-1], self.search_channels), dtype=np.float32)
        codes = stored[..., : self.dims]
        np.multiply(codes, self.state["step"], out=out[..., :-1], casting="unsafe")
        if self.exponent:
            e = stored[..., self.dims].astype(np.int32)
            if e.any():  # power-of-two scaling: exact
                out[..., :-1] = np.ldexp(out[..., :-1], e[..., None])
        return out

    def decoded_features(self, stored: np.ndarray) -> np.ndarray:
        """Stored rows -> the decoded features themselves (n, h, w, C), float64 for pca (for the
        tests' brute-force oracle and the accuracy benchmark)."""
        if not self.is_pca:
            return stored.astype(np.float32)
        scaled = stored[..., : self.dims] * self.state["step"].astype(np.float64)
        if self.exponent:
            scaled = np.ldexp(scaled, stored[..., self.dims:].astype(np.int32))
        return self.state["mean"] + scaled @ self.state["basis"].T

    # --- query side ----------------------------------------------------------------------------

    def query(self, feats: np.ndarray) -> np.ndarray:
        """Query features (..., C) float32 -> search-space rows (..., search_channels) float32.

        For pca the projection runs in float64 (torch: numpy's BLAS threads would slow the
        torch GEMMs that follow) and is rounded once to float32, per image, so the result does
        not depend on the batch."""
        if not self.is_pca:
            return feats
        import torch

        s = self.state
        shape = feats.shape[:-1]
        x = torch.from_numpy(np.ascontiguousarray(feats).reshape(-1, self.channels)).double()
        xc = x - torch.from_numpy(s["mean"])
        p = xc @ torch.from_numpy(s["basis"])
        residual = ((xc * xc).sum(1) - (p * p).sum(1)).clamp_min(0.0).sqrt()
        out = torch.cat([p, residual[:, None]], dim=1).float().numpy()
        return out.reshape(*shape, self.search_channels)
