"""Every parameter of the library, validated once (SPEC 1.1), with a JSON round trip.

Two frozen records:

- :class:`SpadeConfig` is *what* is computed. Its feature half (backbone, weights identity,
  resize, crop, levels, dtype) decides what is written into a corpus file, and a store refuses
  a reader or writer whose feature half differs. Its scoring half (k_image, k_gallery, kappa,
  pixel_mode, sigma, nprobe, search, radius) changes how a query is answered and may differ
  per call.
- :class:`RunOptions` is *how* it is computed (device, batching, memory bounds, engines, the
  image index to build). No option changes a result beyond float32 rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

BACKBONES = ("wide_resnet50_2", "wide_resnet101_2", "resnet18", "resnet50")
LEVELS = ("layer1", "layer2", "layer3")
PIXEL_MODES = ("per_level", "concat")
DTYPES = ("float16", "float32")
SEARCHES = ("exact", "window")
FEATURE_KEYS = ("backbone", "weights_sha256", "resize", "crop", "levels", "dtype")
SCORING_KEYS = ("k_image", "k_gallery", "kappa", "pixel_mode", "sigma", "nprobe", "search", "radius")
STAGE2_ENGINES = ("auto", "pruned", "dense", "faiss")
OPTION_KEYS = ("device", "batch_size", "workers", "cache_bytes", "chunk_bytes", "stage2", "gpu_float16", "index",
               "nlist", "encoding", "target_recall")
# The constructor parameters of Spade: the scoring and feature halves, the weights source, the options.
FEATURE_PARAMS = ("backbone", "weights", "resize", "crop", "levels", "dtype", "seed")
PARAMS = SCORING_KEYS + FEATURE_PARAMS + OPTION_KEYS
INDEX_KINDS = ("auto", "flat", "ivf")
DEVICE_HELP = "expected 'auto', 'cpu' or 'cuda[:N]'"


@dataclasses.dataclass(frozen=True)
class SpadeConfig:
    """What SPADE computes (SPEC 1.1); the defaults are the paper's.

    Parameters
    ----------
    backbone : str
        One of ``BACKBONES``.
    weights_sha256 : str or None
        Identity of the backbone weights (sha256 of their tensors), filled in by the extractor.
    resize, crop : int
        Square resize with ``INTER_AREA`` then a centre crop, ``crop <= resize``.
    levels : tuple of str
        Feature pyramid levels kept for stage 2, a non-empty sorted subset of ``LEVELS``.
    dtype : str
        Storage dtype of the levels, ``"float16"`` or ``"float32"``.
    k_image : int
        Image score = mean of the ``k_image`` smallest squared distances of pooled features.
    k_gallery : int
        Retrieved images whose patches form the stage-2 gallery.
    kappa : int
        Pixel score = mean of the ``kappa`` smallest squared patch distances.
    pixel_mode : str
        ``"per_level"`` or ``"concat"``.
    sigma : float
        Gaussian smoothing of the map, in pixels of the crop; 0 disables it.
    nprobe : int or None
        IVF probes at search time (None: the index's tuned default).
    search : str
        ``"exact"`` (SPADE) or ``"window"``: each query location is compared only with gallery
        locations within ``radius`` cells at the same level (an approximation, opt-in).
    radius : int
        Window half-size in cells of each level's grid (``search="window"`` only).
    """

    backbone: str = "wide_resnet50_2"
    weights_sha256: str | None = None
    resize: int = 256
    crop: int = 224
    levels: tuple = LEVELS
    dtype: str = "float16"
    k_image: int = 5
    k_gallery: int = 50
    kappa: int = 1
    pixel_mode: str = "per_level"
    sigma: float = 4.0
    nprobe: int | None = None
    search: str = "exact"
    radius: int = 1

    def __post_init__(self):
        object.__setattr__(self, "levels", tuple(self.levels))
        check_choice("backbone", self.backbone, BACKBONES)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("pixel_mode", self.pixel_mode, PIXEL_MODES)
        check_choice("search", self.search, SEARCHES)
        for name in ("resize", "crop", "k_image", "k_gallery", "kappa"):
            check_int(name, getattr(self, name))
        check_int("radius", self.radius, minimum=0)
        if self.crop > self.resize:
            raise ValueError(f"crop={self.crop} must be <= resize={self.resize}")
        if self.crop < 32:
            raise ValueError(f"crop={self.crop} is too small: layer3 needs crop >= 32")
        if self.k_image > self.k_gallery:
            raise ValueError(f"k_image={self.k_image} must be <= k_gallery={self.k_gallery}")
        bad = [lv for lv in self.levels if lv not in LEVELS]
        if not self.levels or bad or list(self.levels) != sorted(self.levels):
            raise ValueError(f"levels={list(self.levels)}: expected a sorted non-empty subset of {list(LEVELS)}")
        if self.pixel_mode == "concat" and self.levels[0] != "layer1":
            raise ValueError("pixel_mode='concat' upsamples to the layer1 grid: levels must include 'layer1'")
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) or not self.sigma >= 0:
            raise ValueError(f"sigma={self.sigma!r}: expected a number >= 0")
        if self.nprobe is not None:
            check_int("nprobe", self.nprobe)

    def replace(self, **changes) -> SpadeConfig:
        """A copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)

    def feature_dict(self) -> dict[str, Any]:
        """The half that decides the stored features (what a store must match)."""
        return {k: (list(self.levels) if k == "levels" else getattr(self, k)) for k in FEATURE_KEYS}

    def scoring_dict(self) -> dict[str, Any]:
        """The half that decides how a query is answered."""
        return {k: getattr(self, k) for k in SCORING_KEYS}

    def to_json(self) -> str:
        return json.dumps({**self.feature_dict(), **self.scoring_dict()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SpadeConfig:
        d = json.loads(text)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How the work is done; no option changes a result beyond float32 rounding.

    Parameters
    ----------
    device : str
        Backbone and stage-2 device: ``auto`` (a GPU when one is usable), ``cpu``, ``cuda[:N]``.
    batch_size : int
        Images per backbone batch.
    workers : int
        Image decoding threads (they run ahead of the backbone).
    cache_bytes : int
        Bound of the gallery cache (features of retrieved images, reused across queries).
    chunk_bytes : int
        Gallery bytes searched at once by the ``faiss`` stage-2 engine.
    stage2 : str
        ``auto`` (``pruned`` on CPU, ``faiss`` on GPU), ``pruned`` (exact, bound-based, CPU) or
        ``faiss`` (exact brute force, CPU or GPU).
    gpu_float16 : bool
        The ``faiss`` engine on GPU searches in float16 (faster, ~1e-3 relative error).
    index : str
        Image index built over the pooled vectors: ``auto``, ``flat`` or ``ivf``.
    nlist : int or None
        IVF lists (None: ``4*sqrt(N)``, SPEC 3).
    encoding : str
        IVF list encoding: ``Flat``, ``SQ8`` or ``PQ{m}``.
    target_recall : float
        IVF: the default ``nprobe`` is the smallest reaching this recall@k_gallery against
        exact search, measured at build time.
    seed : int
        Seed of random-init weights and of IVF training samples.
    """

    device: str = "auto"
    batch_size: int = 8
    workers: int = 2
    cache_bytes: int = 1 << 30
    chunk_bytes: int = 64 << 20
    stage2: str = "auto"
    gpu_float16: bool = False
    index: str = "auto"
    nlist: int | None = None
    encoding: str = "Flat"
    target_recall: float = 0.99
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"device={self.device!r}: {DEVICE_HELP}")
        for name in ("batch_size", "workers", "cache_bytes", "chunk_bytes"):
            check_int(name, getattr(self, name))
        check_int("seed", self.seed, minimum=0)
        check_choice("stage2", self.stage2, STAGE2_ENGINES)
        check_choice("index", self.index, INDEX_KINDS)
        if self.nlist is not None:
            check_int("nlist", self.nlist)
        check_encoding(self.encoding)
        if isinstance(self.target_recall, bool) or not isinstance(self.target_recall, (int, float)) \
                or not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall={self.target_recall!r}: expected a number in (0, 1]")
        if not isinstance(self.gpu_float16, bool):
            raise ValueError(f"gpu_float16={self.gpu_float16!r}: expected True or False")


class Parameters:
    """scikit-learn style access to the constructor parameters ``PARAMS`` of a class whose
    ``_configure(weights_sha256)`` validates them into ``config_`` and ``options_``."""

    def get_params(self) -> dict:
        return {name: getattr(self, name) for name in PARAMS}

    def set_params(self, **params):
        """Change parameters; once a corpus is attached only scoring parameters and run options
        may change (the features are fixed by the corpus). Validated at once; on error nothing
        changes."""
        unknown = sorted(set(params) - set(PARAMS))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}: expected any of {list(PARAMS)}")
        config = getattr(self, "config_", None)
        fixed = [k for k in params if k in FEATURE_PARAMS and params[k] != getattr(self, k)]
        if config is not None and fixed:
            raise ValueError(f"{fixed} decide the stored features: build a new corpus to change them")
        old = self.get_params()
        for name, value in params.items():
            setattr(self, name, value)
        if config is not None:
            try:
                self._configure(config.weights_sha256)
            except ValueError:
                for name, value in old.items():
                    setattr(self, name, value)
                raise
        return self

    def with_params(self, **params):
        """A copy with other scoring parameters or options; it shares the original's corpus,
        model and caches (the original is left unchanged)."""
        return copy.copy(self).set_params(**params)


def make_configs(params: dict, weights_sha256: str | None = None) -> tuple[SpadeConfig, RunOptions]:
    """Validate Spade's parameters (a dict with every name of ``PARAMS``) into the two records."""
    config = SpadeConfig(weights_sha256=weights_sha256, **{k: params[k] for k in SCORING_KEYS + FEATURE_KEYS
                                                           if k != "weights_sha256"})
    return config, RunOptions(seed=params["seed"], **{k: params[k] for k in OPTION_KEYS})


def feature_mismatch(stored: dict, wanted: dict) -> list[str]:
    """Keys of the feature half whose values differ, as ``key: stored != wanted`` lines."""
    return [f"{k}: store has {stored.get(k)!r}, requested {wanted.get(k)!r}"
            for k in FEATURE_KEYS if stored.get(k) != wanted.get(k)]


def check_encoding(encoding) -> None:
    """``Flat``, ``SQ8`` or ``PQ{m}`` (m a positive integer)."""
    ok = encoding in ("Flat", "SQ8") or (isinstance(encoding, str) and encoding.startswith("PQ")
                                        and encoding[2:].isdigit() and int(encoding[2:]) > 0)
    if not ok:
        raise ValueError(f"encoding={encoding!r}: expected 'Flat', 'SQ8' or 'PQ<m>' (e.g. PQ64)")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {list(choices)}")


def check_int(name, value, minimum: int = 1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name}={value!r}: expected {kind}")
