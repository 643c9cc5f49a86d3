"""Vision transformers as backbones, through timm: DINOv2 and DINOv3 ViTs whose patch tokens
after chosen blocks are the levels (``block00``..``block11``: the tokens after block i, 0-based
as timm counts, passed through the model's final LayerNorm as timm's feature extraction does)
and whose pooled vector is the model's own image embedding (``forward_head(pre_logits=True)``:
the class token for DINOv2, the mean of the tokens for DINOv3 as timm configures them).

Every block's tokens are returned: one extractor serves corpora that keep different blocks.
The grid is ``crop / patch`` on each side (``dynamic_img_size``: the position embeddings are
interpolated to it, so any crop that is a multiple of the patch size works: 224 or 448, say).

Adding another extractor is a module like this one or ``resnets.py`` (a ``torch.nn.Module``
whose ``forward(x)`` returns ``{level: (B, C, h, w), ..., "pool": (B, D)}``), a row in
``config.py``'s backbone table, and a branch in ``backbone.build_model`` that builds it.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import VIT_BACKBONES


def timm_name(backbone: str) -> str:
    return VIT_BACKBONES[backbone][0]


class ViT(nn.Module):
    """``forward(x)`` -> ``{"block00".."blockNN": (B, C, h, w), "pool": (B, D)}`` of a timm ViT."""

    def __init__(self, backbone: str, pretrained: bool = False):
        super().__init__()
        import timm  # imported where a ViT is built: the CNN path never pays for it

        self.depth = VIT_BACKBONES[backbone][1]
        self.net = timm.create_model(timm_name(backbone), pretrained=pretrained, num_classes=0,
                                     dynamic_img_size=True)

    def forward(self, x) -> dict[str, torch.Tensor]:
        final, blocks = self.net.forward_intermediates(x, indices=list(range(self.depth)), norm=True,
                                                       output_fmt="NCHW")
        out = {f"block{i:02d}": t for i, t in enumerate(blocks)}
        out["pool"] = self.net.forward_head(final, pre_logits=True)
        return out

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        """State dicts in timm's own names (a hub file, ``net.``-less) or this module's."""
        if state and not next(iter(state)).startswith("net."):
            state = {f"net.{k}": v for k, v in state.items()}
        return super().load_state_dict(state, strict=strict, assign=assign)
