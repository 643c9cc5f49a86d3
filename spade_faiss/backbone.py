"""FeatureExtractor: images -> {layer1, layer2, layer3, pool}, and weights resolution (docs/design.md §1)."""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from .config import BACKBONES, DEFAULTS, VIT_BACKBONES
from .resnets import ResNet, random_init

log = logging.getLogger(__name__)


class WeightsError(ValueError):
    """Weights that cannot be obtained or do not fit the backbone."""


def resolve_device(device: str = DEFAULTS["device"]) -> torch.device:
    """``auto`` -> the first CUDA device when one is usable, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r}: expected 'auto', 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: expected 'auto', 'cpu' or 'cuda[:N]'")
    return dev


# The CNNs' ImageNet weights: torchvision's IMAGENET1K_V1 files, by URL (the 8 hex digits in each
# name are the start of its sha256, checked on download by torch.hub). Reading them this way needs
# no torchvision, whose import (torch._dynamo's) took ~1.5 s of every command's start
# (eighteenth wave; ``tests/test_backbone.py`` checks the table against torchvision's registry).
IMAGENET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "wide_resnet50_2": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
    "wide_resnet101_2": "https://download.pytorch.org/models/wide_resnet101_2-32ee1156.pth",
}


def imagenet_cache_path(backbone: str) -> Path:
    """Where the torch hub cache (``TORCH_HOME``) keeps the ImageNet file of ``backbone``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(IMAGENET_URLS[backbone])


PUBLISHED = ("imagenet", "pretrained")  # the published weights: ImageNet for the CNNs, the hub's for ViTs


def check_weights(weights, backbone: str = DEFAULTS["backbone"]) -> None:
    """Refuse a ``weights`` value that can never load, before any model is built."""
    if weights == "imagenet" and backbone in VIT_BACKBONES:
        raise ValueError(f"weights='imagenet': {backbone} has no ImageNet weights; pass weights='pretrained' "
                         f"(CLI: --weights pretrained: its published weights from the Hugging Face hub through "
                         f"timm), a local state_dict file, or None (seeded random init)")
    if weights is None or weights in PUBLISHED:
        return
    if not isinstance(weights, (str, os.PathLike)):
        raise ValueError(f"weights={weights!r}: expected 'imagenet', 'pretrained', a state_dict file, or None")
    if not Path(weights).is_file():
        raise FileNotFoundError(f"weights={str(weights)!r}: no such file "
                                f"(expected 'imagenet', 'pretrained', a state_dict file, or None)")


def load_state_dict(backbone: str, weights) -> dict | None:
    """``"imagenet"``/``"pretrained"`` (the published weights, downloaded when missing: the torch
    hub cache for CNNs, the Hugging Face hub cache through timm for ViTs), a path (a torch
    state_dict or a ``.safetensors`` file), or None (random)."""
    if weights is None:
        return None
    check_weights(weights, backbone)
    if weights in PUBLISHED and backbone in VIT_BACKBONES:
        return _hub_state_dict(backbone)
    if weights in PUBLISHED:
        url = IMAGENET_URLS[backbone]
        try:  # what torchvision's Weights.get_state_dict does, from the hub cache when the file is there
            return torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True, weights_only=True)
        except Exception as e:  # urllib/OSError/hash errors all mean "could not obtain"
            raise WeightsError(
                f"could not obtain ImageNet weights for {backbone} from {url} ({e}). "
                f"Without network, copy that file to {imagenet_cache_path(backbone)} or pass "
                f"a local state_dict with weights=PATH (CLI: --weights PATH)") from None
    path = Path(weights)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: not a loadable torch state_dict ({e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: expected a state_dict (a dict of tensors), got {type(sd).__name__}")
    return sd


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over the parameter and buffer tensors (sorted names, raw bytes).

    Hashing the tensors rather than a file gives one identity for the same weights whatever
    their source (hub cache, a local file, or a seeded random init).
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        a = t.detach().cpu().contiguous().numpy()
        h.update(a.reshape(-1).view(np.uint8) if a.size else b"")  # the raw bytes, without a copy
    return h.hexdigest()


def _hub_state_dict(backbone: str) -> dict:
    """A ViT's published weights (timm's pretrained configuration: the Hugging Face hub cache,
    downloaded when missing)."""
    from .vits import ViT, timm_name

    try:
        return ViT(backbone, pretrained=True).state_dict()
    except Exception as e:  # no network, no hub access, a damaged cache file
        raise WeightsError(f"could not obtain the published weights of {backbone} (timm: {timm_name(backbone)}) "
                           f"from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                           f"Without network, save them where there is (torch.save(model.state_dict(), PATH)) "
                           f"and pass weights=PATH (CLI: --weights PATH)") from None


def _architecture(backbone: str) -> torch.nn.Module:
    """The module, its tensors unset (meta device) where every tensor comes from a state_dict;
    a ViT is built whole (timm computes buffers that no state_dict holds, e.g. DINOv3's rotary
    periods), drawing its throwaway init from a forked random state."""
    if backbone in VIT_BACKBONES:
        from .vits import ViT

        with torch.random.fork_rng(devices=[]):
            return ViT(backbone)
    with torch.device("meta"):
        return ResNet(backbone)


def build_model(backbone: str, weights, seed: int = DEFAULTS["seed"]) -> torch.nn.Module:
    """The backbone (``resnets.ResNet`` or ``vits.ViT``) with the requested weights, in eval
    mode, float32."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone={backbone!r}: expected one of {list(BACKBONES)}")
    state = load_state_dict(backbone, weights)
    if state is None:
        state = _random_init(backbone, seed)
    # The weights replace every tensor: build the module without memory or random init (meta
    # device) and take the given tensors as they are (assign), instead of initialising 69M
    # parameters only to overwrite them.
    model = _architecture(backbone)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise WeightsError(f"weights={str(weights)!r} do not fit backbone {backbone}: "
                           + " ".join(s.strip() for s in first)) from None
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise WeightsError(f"weights={str(weights)!r} leave {left[:3]} of backbone {backbone} unset")
    return model.eval().float()


def _random_init(backbone: str, seed: int) -> dict:
    """torchvision's seeded random init of ``backbone`` as a state_dict (the identity random-init
    corpora were built with). It draws from torch's global RNG: forked, so that building a
    model leaves the caller's random state untouched, and seeded for determinism."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if backbone in VIT_BACKBONES:  # timm's own init of the architecture
            from .vits import ViT

            return ViT(backbone).state_dict()
        return random_init(backbone)  # torchvision's, drawn without importing it


COMPUTES = ("float32", "bfloat16")  # the backbone's arithmetic (FeatureExtractor.__call__'s ``compute``)
# Images per forward where batching is proven bitwise (FeatureExtractor._batched): on 2 cores
# (Xeon, AMX) a Wide-ResNet50-2 at 224 px took 0.145 s per image alone, 0.117 in pairs, 0.096 in
# fours and eights, its transient memory 48, 95, 135 and 297 MB (twentieth wave).
FORWARD_BATCH = 4


def query_compute(search: str, device: torch.device) -> str:
    """The backbone arithmetic of queries under ``search``: ``bfloat16`` for the ``fast`` search
    on a CUDA device, or on a CPU that multiplies bfloat16 natively and faster than float32 (the
    pruned engine's measured choice, ``patch_search.bounds.operand_dtype``); else ``float32``,
    the arithmetic of every stored feature, as the exact and window searches always use."""
    if search != "fast":
        return "float32"
    if device.type == "cuda":
        return "bfloat16"
    from .patch_search.bounds import operand_dtype

    return "bfloat16" if operand_dtype() == torch.bfloat16 else "float32"


class FeatureExtractor:
    """A backbone cut at its levels and its pooled vector: a CNN at ``layer1..3`` and
    ``avgpool`` (``resnets.ResNet``), a ViT at every block's patch tokens and its image
    embedding (``vits.ViT``).

    Parameters
    ----------
    backbone : str
        ``wide_resnet50_2`` (default), ``wide_resnet101_2``, ``resnet18``, ``resnet50``, or a
        DINOv2/DINOv3 ViT (``config.VIT_BACKBONES``).
    weights : {"imagenet", "pretrained"} or path or None
        The published weights (ImageNet via the torch hub cache for CNNs; ``pretrained`` also
        for ViTs, from the Hugging Face hub), a local state_dict, or seeded random init.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
    seed : int
        Seed of the random init (``weights=None`` only).

    Attributes
    ----------
    weights_sha256 : str
        Identity of the loaded weights, stored in corpora and checked on every query.
    """

    def __init__(self, backbone=DEFAULTS["backbone"], weights=DEFAULTS["weights"], device=DEFAULTS["device"],
                 seed=DEFAULTS["seed"]):
        self.backbone = backbone
        self.weights = weights
        self.device = resolve_device(device)
        model = build_model(backbone, weights, seed)
        self.weights_sha256 = state_dict_sha256(model)
        self.model = model.to(self.device).eval()
        self._bfloat16_model: torch.nn.Module | None = None
        self._batch_proven: dict[tuple, bool] = {}  # batch shape -> batched forwards give what images alone do

    def _model(self, compute: str) -> torch.nn.Module:
        """The float32 model, or (``compute="bfloat16"``) a bfloat16 copy made on first use:
        batch norms folded into the convolutions, channels-last (oneDNN's layout for AMX)."""
        if compute == "float32":
            return self.model
        if compute != "bfloat16":
            raise ValueError(f"compute={compute!r}: expected one of {list(COMPUTES)}")
        if self._bfloat16_model is None:
            model = copy.deepcopy(self.model)
            if isinstance(model, ResNet):
                model.fold_batchnorm()
            self._bfloat16_model = model.to(torch.bfloat16).to(memory_format=torch.channels_last)
        return self._bfloat16_model

    def __call__(self, batch: np.ndarray, level_dtype: str = "float32",
                 compute: str = "float32") -> dict[str, np.ndarray]:
        """Features of a preprocessed batch, each image's bitwise the same whatever batch it
        arrives in.

        oneDNN and cuDNN choose kernels by batch shape, and a kernel with another summation order
        would give an image other features in another batch. Images therefore run through the
        model alone, except in groups of ``FORWARD_BATCH`` whose batched forward has been proven
        to compute what the images alone compute (:meth:`_batched`): ~1.5x the throughput of
        one image at a time on 2 CPU cores (twentieth wave).

        Parameters
        ----------
        batch : ndarray, float32, (B, 3, crop, crop)
        level_dtype : {"float32", "float16"}
            dtype of the level maps; the cast happens inside the channels-last copy, so a
            float16 store costs no extra pass.
        compute : {"float32", "bfloat16"}
            The model's arithmetic. ``bfloat16`` (the ``fast`` search's queries, where the
            device multiplies it natively: :func:`query_compute`) runs a copy with folded batch
            norms, ~3x faster on AMX; its features differ from float32's by ~1% (relative norm
            of the difference), so they are never stored.

        Returns
        -------
        dict
            every level (``layer1..3``, or a ViT's ``block00..``): (B, h, w, C) channels-last in
            ``level_dtype``; ``pool``: float32 (B, D).
        """
        model = self._model(compute)
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        if compute == "bfloat16":
            x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        dtype = getattr(torch, level_dtype)
        parts = []
        # float32 math: no TF32 in cuDNN convolutions (it is on by default for convs).
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            for at in range(0, x.shape[0], FORWARD_BATCH):
                for out in self._batched(model, x[at:at + FORWARD_BATCH], compute):
                    feats = {lv: t.permute(0, 2, 3, 1).to(dtype=dtype, memory_format=torch.contiguous_format)
                             for lv, t in out.items() if lv != "pool"}
                    feats["pool"] = out["pool"].flatten(1).float()
                    parts.append({k: v.cpu().numpy() for k, v in feats.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}

    def _batched(self, model: torch.nn.Module, x: torch.Tensor, compute: str) -> list[dict]:
        """The model's outputs for ``x``: one forward when this batch shape is proven to give
        each image what it gets alone, else a forward per image.

        The proof is the first batch of its shape (and thread count, arithmetic, device): its
        images run alone (those are its results), then together, and the two must agree bit for
        bit in every output. A kernel is chosen by shapes, not values, so another summation order
        would show in millions of outputs; images that are constant (nothing to sum in another
        order) prove nothing and the next batch tries again."""
        n = x.shape[0]
        key = (tuple(x.shape[1:]), n, compute, str(self.device), torch.get_num_threads())
        if n > 1 and self._batch_proven.get(key):
            return [model(x)]
        alone = [model(x[i:i + 1]) for i in range(n)]
        if n > 1 and key not in self._batch_proven and bool((x.flatten(1).float().std(dim=1) > 0).all()):
            together = model(x)
            self._batch_proven[key] = all(torch.equal(together[k], torch.cat([a[k] for a in alone]))
                                          for k in together)
            if not self._batch_proven[key]:
                log.info("batched forwards of %s differ from single images' on %s: one image at a time", key,
                         self.device)
        return alone


def load_extractor(backbone: str, weights, device: str, seed: int, expected_sha256: str | None) -> FeatureExtractor:
    """A FeatureExtractor whose weights are those identified by ``expected_sha256`` (when given),
    else a ``WeightsError`` that says how to get the corpus's own."""
    extractor = FeatureExtractor(backbone, weights, device, seed)
    if expected_sha256 is not None and extractor.weights_sha256 != expected_sha256:
        given = f"random init (seed {seed})" if weights is None else repr(str(weights))
        raise WeightsError(f"weights={given} differ from those the corpus was built with "
                           f"(sha256 {extractor.weights_sha256[:12]} vs {expected_sha256[:12]}): leave --weights "
                           f"out to use the corpus's own, or pass the same file")
    return extractor
