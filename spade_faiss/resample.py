"""Bilinear resampling with torch ``F.interpolate(align_corners=False)`` semantics (docs/design.md §1),
shared by concat-mode features and map upsampling."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def bilinear(maps: np.ndarray, size: int) -> np.ndarray:
    """Resize channels-last (B, h, w, C) maps to (B, size, size, C), float32."""
    if maps.shape[1] == size and maps.shape[2] == size:
        return np.asarray(maps, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32)).permute(0, 3, 1, 2)
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1).contiguous().numpy()


def concat_levels(levels) -> np.ndarray:
    """``concat`` mode features: every level upsampled to the first level's grid and
    concatenated along channels, (B, h1, w1, sum C) float32."""
    size = levels[0].shape[1]
    return np.concatenate([bilinear(m, size) for m in levels], axis=-1)
