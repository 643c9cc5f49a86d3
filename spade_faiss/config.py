"""Every parameter of the library, declared once (:data:`PARAMETERS`), validated once, with a
JSON round trip.

The table is the one owner of each parameter's name, default, constraint, part and help text:
:class:`SpadeConfig` and :class:`RunOptions` take their fields and defaults from it, ``Spade``'s
signature and docstring, the command line's options and their help, and the parameter lists of
the commands, Ray and the service are derived from it (``tests/test_config.py`` checks that
nothing else declares one).

Two frozen records:

- :class:`SpadeConfig` is *what* is computed. Its feature half (backbone, weights identity,
  resize, crop, levels, storage) decides what is written into a corpus file, and a store
  refuses a reader or writer whose feature half differs. Its scoring half (k_image, k_gallery,
  kappa, pixel_mode, sigma, nprobe, search, radius) changes how a query is answered and may
  differ per call.
- :class:`RunOptions` is *how* it is computed (device, batching, memory bounds, the stage-2
  engine, the image index to build). No option changes a result beyond float32 rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import math
from collections.abc import Callable
from typing import Any

from .representations import canonical, check_storage, is_fitted, per_level

CNN_BACKBONES = ("wide_resnet50_2", "wide_resnet101_2", "resnet18", "resnet50")
LEVELS = ("layer1", "layer2", "layer3")  # a CNN's pyramid (torchvision's stage names)
# Vision transformers through timm (vits.py): name -> (timm architecture, blocks, patch size).
# Their levels are the patch tokens after block i (0-based, timm's index), named block00..; the
# default four follow the 2026 training-free retrieval method (blocks 3/6/9/11 of 12).
VIT_BACKBONES = {"vit_small_patch14_dinov2": ("vit_small_patch14_dinov2.lvd142m", 12, 14),
                 "vit_base_patch14_dinov2": ("vit_base_patch14_dinov2.lvd142m", 12, 14),
                 "vit_small_patch16_dinov3": ("vit_small_patch16_dinov3.lvd1689m", 12, 16),
                 "vit_base_patch16_dinov3": ("vit_base_patch16_dinov3.lvd1689m", 12, 16)}
VIT_LEVELS = ("block03", "block06", "block09", "block11")
BACKBONES = CNN_BACKBONES + tuple(VIT_BACKBONES)
PIXEL_MODES = ("per_level", "concat")
SEARCHES = ("exact", "window", "fast")
IMAGE_SCORES = ("knn", "map_top1", "map_max")
STAGE2_ENGINES = ("auto", "pruned", "dense", "faiss")
INDEX_KINDS = ("auto", "flat", "ivf")
DEVICE_HELP = "expected 'auto', 'cpu' or 'cuda[:N]'"
K_IMAGE_DEFAULT = 5  # k_image=None means min(K_IMAGE_DEFAULT, k_gallery): the one rule, Python and CLI


class Maps(enum.Enum):
    """Which scored images get a pixel map (stage 2): every one, none (image scores only), or
    those above the image threshold tau (``auto``, the paper's gating). One type, one parser per
    surface: Python (True/False/"auto"), the command line (all/none/auto), HTTP (true/false/auto
    and their yes/no/1/0 spellings)."""

    ALL = "all"
    NONE = "none"
    AUTO = "auto"

    @classmethod
    def from_python(cls, value) -> Maps:
        if isinstance(value, cls):
            return value
        if value is True:
            return cls.ALL
        if value is False:
            return cls.NONE
        if isinstance(value, str) and value == "auto":
            return cls.AUTO
        raise ValueError(f"maps={value!r}: expected True, False or 'auto'")

    @classmethod
    def from_cli(cls, text: str) -> Maps:
        return cls(text)

    @classmethod
    def from_http(cls, text: str) -> Maps:
        word = HTTP_MAP_WORDS.get(str(text).lower())
        if word is None:
            raise ValueError(f"map={text!r}: expected one of {sorted(set(HTTP_MAP_WORDS))}")
        return word


HTTP_MAP_WORDS = {"false": Maps.NONE, "0": Maps.NONE, "no": Maps.NONE, "true": Maps.ALL, "1": Maps.ALL,
                  "yes": Maps.ALL, "auto": Maps.AUTO}


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {list(choices)}")


def check_int(name, value, minimum: int = 1, maximum: int | None = None):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or \
            (maximum is not None and value > maximum):
        if maximum is not None:
            kind = f"an integer in [{minimum}, {maximum}]"
        else:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name}={value!r}: expected {kind}")


def _check_text(name, value):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}={value!r}: expected a non-empty string")


def check_number(name, value, low: float, high: float | None = None, low_open: bool = False):
    """A finite real number in ``[low, high]`` (``(low, high]`` when ``low_open``; no ``high``:
    any finite number above ``low``: an infinite budget, width or size is no setting, and one
    reached ``int()`` and failed there)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and \
        (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        span = f"{'(' if low_open else '['}{low}, " + (f"{high}]" if high is not None else "inf)")
        raise ValueError(f"{name}={value!r}: expected a finite number in {span}")


def check_encoding(name, encoding) -> None:
    """``Flat``, ``SQ8`` or ``PQ{m}`` (m a positive integer)."""
    ok = encoding in ("Flat", "SQ8") or (isinstance(encoding, str) and encoding.startswith("PQ")
                                        and encoding[2:].isdigit() and int(encoding[2:]) > 0)
    if not ok:
        raise ValueError(f"{name}={encoding!r}: expected 'Flat', 'SQ8' or 'PQ<m>' (e.g. PQ64)")


def check_device(name, device) -> None:
    if not isinstance(device, str) or not (device in ("auto", "cpu") or device.startswith("cuda")):
        raise ValueError(f"{name}={device!r}: {DEVICE_HELP}")


def backbone_levels(backbone: str) -> tuple[str, ...]:
    """Every level ``backbone`` gives, finest (or earliest) first."""
    if backbone in VIT_BACKBONES:
        return tuple(f"block{i:02d}" for i in range(VIT_BACKBONES[backbone][1]))
    return LEVELS


def default_levels(backbone: str) -> tuple[str, ...]:
    """The levels kept when none are named: a CNN's three, a ViT's four (``VIT_LEVELS``)."""
    return VIT_LEVELS if backbone in VIT_BACKBONES else LEVELS


def check_levels(name, levels) -> None:
    """None (the backbone's default levels) or a non-empty sorted list of level names; which
    names a backbone has is checked with the backbone (:class:`SpadeConfig`)."""
    if levels is None:
        return
    ok = isinstance(levels, (list, tuple)) and levels and all(isinstance(lv, str) for lv in levels)
    if not ok or list(levels) != sorted(set(levels)):
        raise ValueError(f"{name}={levels!r}: expected None (the backbone's) or a sorted non-empty list of level "
                         f"names, e.g. {list(LEVELS)} or {list(VIT_LEVELS)}")


def check_bool(name, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected True or False")


def _optional(check: Callable) -> Callable:
    return lambda name, value: None if value is None else check(name, value)


def _choice(choices) -> Callable:
    return lambda name, value: check_choice(name, value, choices)


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter: where it belongs, its default, its constraint and its help text.

    ``part``: ``feature`` (decides the stored features), ``source`` (where the weights come from;
    recorded in the corpus), ``scoring`` (how a query is answered) or ``option`` (how the work is
    done): these four are ``Spade``'s parameters. ``calibration`` (the thresholds' false-positive
    rate) and ``service`` (the HTTP service's address and limits) are arguments of commands and
    functions, not of ``Spade``; so is ``input`` (which frames of a video are items). ``cli``: the
    option group on the command line, or None for Python only. ``choices`` also go to the command
    line; ``cli_type`` converts its text; ``option``: the command line's spelling when it is not
    ``--name`` with dashes.
    """

    name: str
    default: Any
    part: str
    check: Callable
    help: str
    cli: str | None = None
    choices: tuple | None = None
    cli_type: Callable | None = None
    option: str | None = None

    @property
    def flag(self) -> str:
        return self.option or "--" + self.name.replace("_", "-")

    def check_value(self, value) -> None:
        """Raise ``ValueError`` naming the parameter unless ``value`` satisfies its constraint."""
        self.check(self.name, value)


def _float_or_none(value: str):
    return None if value.lower() == "none" else float(value)


def _weights_arg(value: str):
    return None if value.lower() in ("none", "random") else value


PARAMETERS: tuple[Param, ...] = (
    # --- scoring (docs/design.md §1; defaults are the paper's) ---
    Param("k_image", None, "scoring", _optional(check_int),
          f"image score = mean of the k_image smallest squared distances of pooled vectors "
          f"(default: min({K_IMAGE_DEFAULT}, k_gallery); at most k_gallery)", "scoring", cli_type=int),
    Param("k_gallery", 50, "scoring", check_int, "retrieved normal images per query (stage 1), whose patches "
          "form the stage-2 gallery (more than the corpus holds: all of it, with a warning)", "scoring",
          cli_type=int),
    Param("kappa", 1, "scoring", check_int, "pixel score = mean of the kappa smallest squared patch distances",
          "scoring", cli_type=int),
    Param("pixel_mode", "per_level", "scoring", _choice(PIXEL_MODES),
          "per_level: one gallery per level, maps averaged; concat: layer2/3 upsampled to the layer1 grid and "
          "concatenated", "scoring", PIXEL_MODES),
    Param("sigma", 4.0, "scoring", lambda n, v: check_number(n, v, 0.0),
          "Gaussian smoothing of maps, in pixels of the crop (0: none)", "scoring", cli_type=float),
    Param("nprobe", None, "scoring", _optional(check_int),
          "IVF probes at search time (default: the index's tuned value)", "scoring", cli_type=int),
    Param("search", "exact", "scoring", _choice(SEARCHES),
          "exact (SPADE); window: each location compared only with gallery locations within --radius cells "
          "of its position (faster, an approximation; see benchmarks/README.md); fast: the window at radius 0, "
          "the same position in every retrieved image, queries through a bfloat16 backbone where the device "
          "multiplies it natively (the fastest; its fidelity to exact is in the README)",
          "scoring", SEARCHES),
    Param("radius", 1, "scoring", lambda n, v: check_int(n, v, minimum=0),
          "window half-size in cells of each level's grid (search=window only; fast is radius 0)", "scoring",
          cli_type=int),
    Param("image_score", "knn", "scoring", _choice(IMAGE_SCORES),
          "the image score compared with tau: knn (the paper's: mean squared distance of the pooled vector to "
          "its k_image nearest normal images), map_top1 (mean of the top 1% of the map's pixels) or map_max "
          "(the map's maximum); map-based scores need maps (not --maps none/auto); both the knn and the map "
          "score are reported", "scoring", IMAGE_SCORES),
    Param("same_position", False, "scoring", check_bool,
          "tiles: each test tile retrieves its k_gallery nearest normal tiles among those cut at its own "
          "position and size only (a whole image among the whole images); default: from any position",
          "scoring"),
    # --- features (fixed for a corpus) ---
    Param("backbone", "wide_resnet50_2", "feature", _choice(BACKBONES),
          "the feature extractor: " + " | ".join(BACKBONES), "features"),
    Param("weights", "imagenet", "source", lambda n, v: None,
          "'imagenet' (a CNN's ImageNet weights, torch hub cache, downloaded when missing), 'pretrained' (the "
          "backbone's published weights: ImageNet for a CNN, DINOv2/DINOv3's from the Hugging Face hub for a ViT), "
          "a local state_dict file (.pth or .safetensors), or None/'none' for seeded random init, for tests",
          "features", cli_type=_weights_arg),
    Param("seed", 0, "source", lambda n, v: check_int(n, v, minimum=0),
          "seed of the random init (weights none), of IVF training samples and of the storage's fit sample",
          "features", cli_type=int),
    Param("resize", 256, "feature", check_int, "square resize (INTER_AREA) before the crop", "features",
          cli_type=int),
    Param("crop", 224, "feature", check_int, "centre crop the model sees (at most resize, at least 32)",
          "features", cli_type=int),
    Param("levels", None, "feature", check_levels,
          "feature levels kept for stage 2, a sorted subset of the backbone's (None: layer1-3 of a CNN, blocks "
          "3/6/9/11 of a ViT)"),
    Param("storage", "float16+zstd", "feature", check_storage,
          "how each level is stored: float16+zstd (float16 values, lossless Blosc2 zstd: 1.7x smaller), float16, "
          "float32, float32+zstd, pca<d> (the corpus's "
          "principal directions, int8 codes: about 8x smaller, lossy), compact (pca per level, ~0.3 MB per "
          "image); one name for all levels or LEVEL=NAME,... (docs/design.md, section 'Stored "
          "representations')", "features", cli_type=str),
    # --- run options (how the work is done) ---
    Param("device", "auto", "option", check_device, "auto | cpu | cuda[:N] (auto: a GPU when one is usable)",
          "run"),
    Param("batch_size", 8, "option", check_int, "images per backbone batch", "run", cli_type=int),
    Param("workers", 2, "option", check_int, "image decoding threads (they run ahead of the backbone)", "run",
          cli_type=int),
    Param("cache_bytes", None, "option", _optional(check_int),
          "bound of the gallery cache (features of retrieved images, reused across queries); default: what "
          "memory_gb leaves, or 1 GiB without a budget"),
    Param("memory_gb", 2.0, "option", _optional(lambda n, v: check_number(n, v, 0.0, low_open=True)),
          "resident memory budget in GiB: the gallery cache gets what the process leaves of it and shrinks "
          "when the process is over it after a batch (Linux; none: the cache keeps cache_bytes, 1 GiB by default). "
          "A larger budget "
          "keeps more galleries in memory (fewer read back from the spill, spill_gb)", "run", cli_type=_float_or_none),
    Param("spill_gb", 8.0, "option", lambda n, v: check_number(n, v, 0.0, 1e6),
          "disk in GiB for the gallery entries memory_gb evicts: a private temporary file (TMPDIR, deleted with "
          "the process; never on tmpfs, at most a quarter of the free space, never below 2 GiB free) that a later "
          "miss reads back instead "
          "of reading and preparing the image again; 0: none", "run", cli_type=float),
    Param("chunk_bytes", 64 << 20, "option", check_int, "gallery bytes searched at once by the faiss engine"),
    Param("stage2", "auto", "option", _choice(STAGE2_ENGINES),
          "exact stage-2 engine: pruned (bounds, CPU), dense (every pair, CPU), faiss (brute force, CPU/GPU); "
          "auto: pruned on CPU (dense for small levels), faiss on GPU", "scoring", STAGE2_ENGINES),
    Param("gpu_float16", False, "option", check_bool,
          "the faiss engine on GPU searches in float16 (faster, ~1e-3 relative error)"),
    Param("index", "auto", "option", _choice(INDEX_KINDS),
          "the image index: auto (exact Flat below 50,000 images or when IVF would not be faster, IVF above), "
          "flat or ivf", "index", INDEX_KINDS),
    Param("nlist", None, "option", _optional(check_int), "IVF lists (default: 4*sqrt(N), at most N/39)", "index",
          cli_type=int),
    Param("encoding", "Flat", "option", check_encoding, "IVF list encoding: Flat, SQ8 or PQ<m>", "index"),
    Param("target_recall", 0.99, "option", lambda n, v: check_number(n, v, 0.0, 1.0, low_open=True),
          "IVF: recall@k_gallery against exact search that the default nprobe must reach", "index",
          cli_type=float),
    # --- calibration (calibrate, evaluate, Spade.calibrate) ---
    Param("fpr", 0.01, "calibration", lambda n, v: check_number(n, v, 0.0, 1.0, low_open=True),
          "false-positive rate of the calibrated thresholds on held-out normal images and their pixels",
          "calibration", cli_type=float),
    Param("event_s", 1.0, "calibration", lambda n, v: check_number(n, v, 0.0, 1e6, low_open=True),
          "of held-out normal videos: the shortest anomalous event to catch (seconds); calibrate chooses the "
          "temporal smoothing width with which such an event needs the smallest score increase to clear the "
          "smoothed normal frames' threshold", "calibration", cli_type=float),
    # --- inputs: which frames of a video are items (index, calibrate, score; datasets.discover) ---
    Param("frame_stride", 1, "input", lambda n, v: check_int(n, v, 1),
          "of a video, every N-th frame is an item (the paper's STC protocol: 5)", "input", cli_type=int),
    Param("start_s", 0.0, "input", lambda n, v: check_number(n, v, 0.0, 1e7),
          "of a video, frames from this time (seconds)", "input", cli_type=float),
    Param("end_s", None, "input", _optional(lambda n, v: check_number(n, v, 0.0, 1e7, low_open=True)),
          "of a video, frames before this time (seconds; default: to the end)", "input", cli_type=_float_or_none),
    Param("temporal_sigma", None, "input", _optional(lambda n, v: check_number(n, v, 0.0, 10_000.0)),
          "of videos: Gaussian smoothing of each video's frame scores along its sampled frames (sigma in frames; "
          "0: none): frames.csv holds raw and smoothed scores, the decision uses the smoothed one (default: the "
          "width calibrate chose on held-out normal videos, else 0)", "input", cli_type=_float_or_none),
    # --- inputs: which tiles of an image are items (index, calibrate, score; tiles.py) ---
    Param("tile", None, "input", _optional(lambda n, v: check_int(n, v, 16, 100_000)),
          "cut every image into TILE x TILE tiles, each an item (high-resolution parts: index the normals' "
          "tiles, score the test images' tiles; tiled.csv gives each image its largest tile score and a "
          "stitched map; default: whole images)", "tiles", cli_type=int),
    Param("tile_overlap", 0, "input", lambda n, v: check_int(n, v, 0, 100_000),
          "pixels neighbouring tiles share (less than --tile; cover the centre crop's margins with at least "
          "(1 - crop/resize)/2 of the tile)", "tiles", cli_type=int),
    # --- the service (`serve` options and `create_app` arguments) ---
    Param("host", "127.0.0.1", "service", lambda n, v: _check_text(n, v),
          "interface to bind (loopback only by default)", "service"),
    Param("port", 8000, "service", lambda n, v: check_int(n, v, 0, 65535), "TCP port (0: any free one)",
          "service", cli_type=int),
    Param("max_upload_mb", 32.0, "service", lambda n, v: check_number(n, v, 0.0, low_open=True),
          "larger uploads are refused (413)", "service", cli_type=float),
    Param("max_pixels", 50_000_000, "service", check_int, "larger images are refused (413)", "service",
          cli_type=int),
    Param("timeout_s", 30.0, "service", lambda n, v: check_number(n, v, 0.0, 86400.0, low_open=True),
          "per-request deadline in seconds", "service", cli_type=float, option="--timeout"),
    Param("queue_size", 64, "service", check_int, "waiting requests per lane before 503", "service", cli_type=int),
    Param("max_batch", 8, "service", lambda n, v: check_int(n, v, 1, 1024), "images per backbone batch", "service",
          cli_type=int),
    Param("batch_window_ms", 5.0, "service", lambda n, v: check_number(n, v, 0.0, 10_000.0),
          "how long a batch waits to fill, in milliseconds", "service", cli_type=float),
    Param("refresh_s", 2.0, "service", lambda n, v: check_number(n, v, 0.0, 86400.0),
          "how often to take in images appended and thresholds calibrated while serving, in seconds (0: never); "
          "the state served is in /v1/info and in each answer", "service", cli_type=float),
)
PARAM = {p.name: p for p in PARAMETERS}
DEFAULTS = {p.name: p.default for p in PARAMETERS}
SPADE_PARTS = ("scoring", "feature", "source", "option")
PARAMS = tuple(p.name for p in PARAMETERS if p.part in SPADE_PARTS)  # Spade's parameters
SERVICE_DEFAULTS = {p.name: p.default for p in PARAMETERS if p.part == "service"}
SCORING_KEYS = tuple(p.name for p in PARAMETERS if p.part == "scoring")
FEATURE_KEYS = ("backbone", "weights_sha256", "resize", "crop", "levels", "storage")
FEATURE_PARAMS = tuple(p.name for p in PARAMETERS if p.part in ("feature", "source"))
OPTION_KEYS = tuple(p.name for p in PARAMETERS if p.part == "option")


def check_values(values: dict) -> None:
    """Check each ``{name: value}`` against its declaration in the table (``ValueError`` naming
    the first value out of range)."""
    for name, value in values.items():
        PARAM[name].check_value(value)


def parameters_doc(names=PARAMS) -> str:
    """The numpydoc ``Parameters`` section of ``names``, from the table."""
    lines = ["Parameters", "----------"]
    for name in names:
        p = PARAM[name]
        lines += [f"{name} : default {p.default!r}", f"    {p.help[0].upper()}{p.help[1:]}."]
    return "\n".join(lines)


def _validate(record, names) -> None:
    for name in names:
        PARAM[name].check(name, getattr(record, name))


@dataclasses.dataclass(frozen=True)
class SpadeConfig:
    """What SPADE computes (docs/design.md §1); the defaults are the paper's. Each field is documented in
    :data:`PARAMETERS`; ``weights_sha256`` (the identity of the backbone weights, sha256 of their
    tensors) is filled in by the extractor. ``k_image=None`` becomes ``min(5, k_gallery)`` and
    ``storage`` its canonical spelling for ``levels``."""

    backbone: str = DEFAULTS["backbone"]
    weights_sha256: str | None = None
    resize: int = DEFAULTS["resize"]
    crop: int = DEFAULTS["crop"]
    levels: tuple = DEFAULTS["levels"]
    storage: str = DEFAULTS["storage"]
    k_image: int | None = DEFAULTS["k_image"]
    k_gallery: int = DEFAULTS["k_gallery"]
    kappa: int = DEFAULTS["kappa"]
    pixel_mode: str = DEFAULTS["pixel_mode"]
    sigma: float = DEFAULTS["sigma"]
    nprobe: int | None = DEFAULTS["nprobe"]
    search: str = DEFAULTS["search"]
    radius: int = DEFAULTS["radius"]
    image_score: str = DEFAULTS["image_score"]
    same_position: bool = DEFAULTS["same_position"]

    @property
    def window(self) -> int | None:
        """The window radius stage 2 searches within (``fast``: 0), or None for the exact search."""
        return {"exact": None, "window": self.radius, "fast": 0}[self.search]

    def __post_init__(self):
        _validate(self, [k for k in FEATURE_KEYS + SCORING_KEYS if k != "weights_sha256"])
        levels = default_levels(self.backbone) if self.levels is None else tuple(self.levels)
        object.__setattr__(self, "levels", levels)
        unknown = [lv for lv in levels if lv not in backbone_levels(self.backbone)]
        if unknown:
            raise ValueError(f"levels={list(levels)}: {unknown} are not levels of {self.backbone} "
                             f"(it has {list(backbone_levels(self.backbone))})")
        object.__setattr__(self, "storage", canonical(self.storage, self.levels))
        if self.k_image is None:
            object.__setattr__(self, "k_image", min(K_IMAGE_DEFAULT, self.k_gallery))
        if self.crop > self.resize:
            raise ValueError(f"crop={self.crop} must be <= resize={self.resize}")
        if self.backbone in VIT_BACKBONES:
            patch = VIT_BACKBONES[self.backbone][2]
            if self.crop % patch or self.crop < 2 * patch:
                raise ValueError(f"crop={self.crop}: {self.backbone} needs a multiple of its patch size {patch} "
                                 f"(at least {2 * patch}), e.g. {224 // patch * patch} or {448 // patch * patch}")
        elif self.crop < 32:
            raise ValueError(f"crop={self.crop} is too small: layer3 needs crop >= 32")
        if self.k_image > self.k_gallery:
            raise ValueError(f"k_image={self.k_image} must be <= k_gallery={self.k_gallery}")
        if self.pixel_mode == "concat" and self.levels[0] in ("layer2", "layer3"):
            raise ValueError("pixel_mode='concat' upsamples to the layer1 grid: levels must include 'layer1'")

    def replace(self, **changes) -> SpadeConfig:
        """A copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)

    def storage_per_level(self) -> dict[str, str]:
        return per_level(self.storage, self.levels)

    @property
    def storage_is_fitted(self) -> bool:
        """Whether some level's representation is fitted on the corpus's first images (pca)."""
        return any(is_fitted(name) for name in self.storage_per_level().values())

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
        d = upgrade_feature_dict(json.loads(text))
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**d)


def upgrade_feature_dict(d: dict) -> dict:
    """A feature configuration as format v1 wrote it (``dtype``) in today's names (``storage``)."""
    d = dict(d)
    if "dtype" in d and "storage" not in d:
        d["storage"] = d.pop("dtype")
    return d


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How the work is done; no option changes a result beyond float32 rounding. Each field is
    documented in :data:`PARAMETERS`."""

    device: str = DEFAULTS["device"]
    batch_size: int = DEFAULTS["batch_size"]
    workers: int = DEFAULTS["workers"]
    cache_bytes: int | None = DEFAULTS["cache_bytes"]
    memory_gb: float | None = DEFAULTS["memory_gb"]
    spill_gb: float = DEFAULTS["spill_gb"]
    chunk_bytes: int = DEFAULTS["chunk_bytes"]
    stage2: str = DEFAULTS["stage2"]
    gpu_float16: bool = DEFAULTS["gpu_float16"]
    index: str = DEFAULTS["index"]
    nlist: int | None = DEFAULTS["nlist"]
    encoding: str = DEFAULTS["encoding"]
    target_recall: float = DEFAULTS["target_recall"]
    seed: int = DEFAULTS["seed"]

    def __post_init__(self):
        _validate(self, OPTION_KEYS + ("seed",))


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
    PARAM["weights"].check("weights", params["weights"])
    config = SpadeConfig(weights_sha256=weights_sha256, **{k: params[k] for k in SCORING_KEYS + FEATURE_KEYS
                                                           if k != "weights_sha256"})
    return config, RunOptions(seed=params["seed"], **{k: params[k] for k in OPTION_KEYS})


def feature_mismatch(stored: dict, wanted: dict) -> list[str]:
    """Keys of the feature half whose values differ, as ``key: stored != wanted`` lines."""
    stored = upgrade_feature_dict(stored)
    return [f"{k}: store has {stored.get(k)!r}, requested {wanted.get(k)!r}"
            for k in FEATURE_KEYS if stored.get(k) != wanted.get(k)]
