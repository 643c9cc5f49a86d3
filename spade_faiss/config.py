"""SpadeConfig: every parameter of SPEC 1.1, validated once, with a JSON round trip.

The configuration has two halves. The *feature* half (backbone, weights identity, resize,
crop, levels, dtype) decides what is written into a corpus file; a store refuses a reader or
writer whose feature half differs. The *scoring* half (k_image, k_gallery, kappa, pixel_mode,
sigma, nprobe) only changes how a query is answered and may differ per call.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

BACKBONES = ("wide_resnet50_2", "wide_resnet101_2", "resnet18", "resnet50")
LEVELS = ("layer1", "layer2", "layer3")
PIXEL_MODES = ("per_level", "concat")
DTYPES = ("float16", "float32")
FEATURE_KEYS = ("backbone", "weights_sha256", "resize", "crop", "levels", "dtype")


@dataclasses.dataclass(frozen=True)
class SpadeConfig:
    """All SPADE parameters (SPEC 1.1); defaults in brackets there are the defaults here.

    Parameters
    ----------
    backbone : str
        One of ``BACKBONES``.
    weights_sha256 : str or None
        Identity of the backbone weights (sha256 of their tensors), filled in by the extractor.
    resize, crop : int
        Square resize with ``INTER_AREA`` then a centre crop, ``crop <= resize``.
    levels : tuple of str
        Feature pyramid levels kept for stage 2, a non-empty subset of ``LEVELS`` in order.
    dtype : str
        Storage dtype of the levels, ``"float16"`` or ``"float32"``.
    k_image : int
        Stage-1 image score = mean of the ``k_image`` smallest squared distances.
    k_gallery : int
        Number of retrieved images whose patches form the stage-2 gallery.
    kappa : int
        Stage-2 pixel score = mean of the ``kappa`` smallest squared distances.
    pixel_mode : str
        ``"per_level"`` or ``"concat"``.
    sigma : float
        Gaussian smoothing of the map, in pixels of the crop; 0 disables it.
    nprobe : int or None
        IVF probes at search time (None: the index's stored default).
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

    def __post_init__(self):
        object.__setattr__(self, "levels", tuple(self.levels))
        _check_choice("backbone", self.backbone, BACKBONES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("pixel_mode", self.pixel_mode, PIXEL_MODES)
        for name in ("resize", "crop", "k_image", "k_gallery", "kappa"):
            _check_positive_int(name, getattr(self, name))
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
        if not (isinstance(self.sigma, (int, float)) and self.sigma >= 0):
            raise ValueError(f"sigma={self.sigma!r}: expected a number >= 0")
        if self.nprobe is not None:
            _check_positive_int("nprobe", self.nprobe)

    def replace(self, **changes) -> SpadeConfig:
        """A copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)

    def feature_dict(self) -> dict[str, Any]:
        """The half that decides the stored features (what a store must match)."""
        d = dataclasses.asdict(self)
        return {k: (list(d[k]) if k == "levels" else d[k]) for k in FEATURE_KEYS}

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["levels"] = list(d["levels"])
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SpadeConfig:
        d = json.loads(text)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**d)


def feature_mismatch(stored: dict, wanted: dict) -> list[str]:
    """Keys of the feature half whose values differ, as ``key: stored != wanted`` lines."""
    return [f"{k}: store has {stored.get(k)!r}, requested {wanted.get(k)!r}"
            for k in FEATURE_KEYS if stored.get(k) != wanted.get(k)]


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {list(choices)}")


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
