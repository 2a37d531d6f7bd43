"""Test-time views: predict each image in several flips or quarter turns, map each prediction
back onto the image, average. One table for the evaluator (`evaluation.tta`) and for
`segflow predict --tta` (flips only: a fixed-size model takes no turned non-square tile)."""
from __future__ import annotations

from typing import Callable

import numpy as np

BatchPredictor = Callable[[np.ndarray], np.ndarray]  # [B,H,W,C] raw pixels -> [B,H,W,K] probabilities

# Views as (quarter turns, horizontal flip first): flips adds the vertical flip (a half turn of
# the horizontal flip) and both flips (a half turn); d4 is every symmetry of the square.
TTA_VIEWS: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "hflip": ((0, False), (0, True)),
    "flips": ((0, False), (0, True), (2, True), (2, False)),
    "d4": tuple((turns, flip) for turns in range(4) for flip in (False, True)),
}


def to_view(images: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    """A view of [N, H, W, C] images: flipped left-right, then turned by quarter turns."""
    return np.ascontiguousarray(np.rot90(images[:, :, ::-1] if flip else images, turns, axes=(1, 2)))


def from_view(probabilities: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    """Undo to_view on per-pixel probabilities, so every view lines up with the image."""
    unturned = np.rot90(probabilities, -turns, axes=(1, 2))
    return unturned[:, :, ::-1] if flip else unturned


def with_tta(predict: BatchPredictor, tta: str) -> BatchPredictor:
    """Mean of the probabilities of each view of the images, mapped back (one call per view)."""
    views = TTA_VIEWS[tta]
    if len(views) == 1:
        return predict
    return lambda images: sum(from_view(predict(to_view(images, turns, flip)), turns, flip) for turns, flip in views) / len(views)
