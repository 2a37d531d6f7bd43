"""The built-in synthetic dataset: filled shapes on textured backgrounds.

Deterministic (seeded), small enough for `make demo` to train, evaluate and export
in a few minutes on two cores. Each class has its own hue, jittered so that colour
ranges overlap a little; the background is a smooth random colour field with noise.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from segflow.utils.io import encode_png

CLASS_NAMES = ["background", "circle", "rectangle", "triangle"]
CLASS_COLOURS = {1: np.array([200.0, 70.0, 60.0]), 2: np.array([60.0, 190.0, 80.0]), 3: np.array([70.0, 90.0, 210.0])}


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random colour field plus pixel noise."""
    coarse = rng.uniform(40, 200, size=(8, 8, 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return smooth + rng.normal(0, 12, size=(size, size, 3)).astype(np.float32)


def _draw(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, label: int) -> None:
    size = image.shape[0]
    extent = int(rng.integers(size // 10, size // 4))
    cx, cy = (int(v) for v in rng.integers(extent, size - extent, size=2))
    colour = CLASS_COLOURS[label] + rng.uniform(-40, 40, size=3)
    layer = np.zeros(mask.shape, np.uint8)
    if label == 1:
        cv2.circle(layer, (cx, cy), extent, 1, thickness=-1)
    elif label == 2:
        half = int(extent * rng.uniform(0.5, 1.0))
        cv2.rectangle(layer, (cx - extent, cy - half), (cx + extent, cy + half), 1, thickness=-1)
    else:
        points = np.array([[cx, cy - extent], [cx - extent, cy + extent], [cx + extent, cy + extent]], np.int32)
        cv2.fillPoly(layer, [points], 1)
    inside = layer.astype(bool)
    image[inside] = colour.astype(np.float32) + rng.normal(0, 10, size=(int(inside.sum()), 3))
    mask[inside] = label


def write_demo_dataset(directory: str | os.PathLike[str], count: int = 64, size: int = 128, seed: int = 0) -> Path:
    """Write `images/NNN.png` (RGB) and `masks/NNN.png` (class ids 0..3)."""
    root = Path(directory)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        image = _texture(rng, size)
        mask = np.zeros((size, size), np.uint8)
        for label in rng.permutation([1, 2, 3])[: int(rng.integers(1, 4))]:
            _draw(rng, image, mask, int(label))
        image8 = np.clip(image, 0, 255).astype(np.uint8)
        (root / "images" / f"{index:03d}.png").write_bytes(encode_png(image8))
        (root / "masks" / f"{index:03d}.png").write_bytes(encode_png(mask))
    return root
