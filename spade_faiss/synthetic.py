"""Seeded synthetic MVTec-layout datasets: a periodic texture, and test images with pasted
defects and their masks. Used by the built-in example, the tests and the benchmarks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def texture(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A grey woven texture with small random phase, contrast and noise (RGB uint8)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 2)
    base = 0.5 + 0.2 * np.sin(xx / 3.0 + phase[0]) * np.sin(yy / 3.0 + phase[1])
    base += rng.normal(0, 0.03, (h, w))
    tint = np.array([1.0, 0.95, 0.9]) * rng.uniform(0.9, 1.1)
    return (np.clip(base[..., None] * tint, 0, 1) * 255).astype(np.uint8)


def paste_defect(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A dark or bright blob pasted in a random place; returns the image and its mask (uint8)."""
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    r = max(3, int(min(h, w) * rng.uniform(0.14, 0.22)))
    cy = int(rng.integers(h // 4, 3 * h // 4))
    cx = int(rng.integers(w // 4, 3 * w // 4))
    cv2.ellipse(mask, (cx, cy), (r, r // 2 + 1), float(rng.uniform(0, 180)), 0, 360, 255, -1)
    out = img.copy()
    colour = np.array([200, 40, 40]) if rng.random() < 0.5 else np.array([20, 20, 20])
    out[mask > 0] = colour
    return out, mask


def write_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img
    if not cv2.imwrite(str(path), arr):
        raise OSError(f"could not write {path}")


def make_dataset(root, n_train: int = 20, n_good: int = 4, n_defect: int = 6,
                 size: tuple[int, int] = (128, 128), seed: int = 0) -> Path:
    """Write an MVTec-layout category ``root`` (train/good, test/good, test/defect,
    ground_truth/defect) and return its path."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        write_png(root / "train" / "good" / f"{i:03d}.png", texture(rng, size))
    for i in range(n_good):
        write_png(root / "test" / "good" / f"{i:03d}.png", texture(rng, size))
    for i in range(n_defect):
        img, mask = paste_defect(rng, texture(rng, size))
        write_png(root / "test" / "defect" / f"{i:03d}.png", img)
        write_png(root / "ground_truth" / "defect" / f"{i:03d}_mask.png", mask)
    return root
