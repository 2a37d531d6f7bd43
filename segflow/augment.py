"""Augmentation policies built from albumentations transforms registered by name.

The config's `augmentation` mapping ({HorizontalFlip: {p: 0.5}, ...}) becomes an
albumentations Compose applied to (image, mask) pairs inside the trainer's tf.data
pipeline. Masks use nearest-neighbour interpolation, so class ids stay class ids.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Any

import albumentations as A
import cv2
import numpy as np

from segflow.registry import AUGMENTATIONS

for _name in (
    "HorizontalFlip",
    "VerticalFlip",
    "RandomRotate90",
    "Transpose",
    "Affine",
    "ElasticTransform",
    "GridDistortion",
    "RandomBrightnessContrast",
    "RandomGamma",
    "GaussNoise",
    "GaussianBlur",
    "CoarseDropout",
):
    AUGMENTATIONS.add(_name, getattr(A, _name))

# Geometric transforms must fill new border pixels in masks with a label the loss ignores
# or treats as background; these defaults keep them at 0 (reflect for images).
_BORDER_DEFAULTS: dict[str, dict[str, Any]] = {
    "Affine": {"border_mode": cv2.BORDER_REFLECT_101},
    "ElasticTransform": {"border_mode": cv2.BORDER_REFLECT_101},
    "GridDistortion": {"border_mode": cv2.BORDER_REFLECT_101},
}


def build_policy(spec: dict[str, dict[str, Any]], seed: int | None = None) -> A.Compose | None:
    """A Compose of the registered transforms, or None for an empty policy."""
    if not spec:
        return None
    transforms = []
    for name, params in spec.items():
        kwargs = {**_BORDER_DEFAULTS.get(name, {}), **(params or {})}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                transforms.append(AUGMENTATIONS.get(name)(**kwargs))
        except (TypeError, ValueError) as error:
            raise ValueError(f"augmentation.{name}: invalid parameters {params}: {error}") from None
        # albumentations only warns about unknown arguments; a typo must not silently do nothing.
        unknown = [str(w.message) for w in caught if "not valid for transform" in str(w.message)]
        if unknown:
            raise ValueError(f"augmentation.{name}: {unknown[0]}")
    return A.Compose(transforms, seed=seed)


def example_seed(seed: int, epoch: int, filename: str) -> int:
    """The augmentation seed of one example in one epoch: a function of the data alone, so
    the draws do not depend on which thread or in which order the example is processed."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{filename}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def seed_policy(transform: Any, seed: int) -> None:
    """Give every transform of a (nested) policy its own random stream derived from `seed`.
    albumentations' own `set_random_seed` hands all children the same seed, which makes
    e.g. HorizontalFlip and VerticalFlip with equal p always fire together."""
    transform.set_random_seed(seed)
    children = getattr(transform, "transforms", [])
    for child, child_seed in zip(children, np.random.SeedSequence(seed).generate_state(len(children))):
        seed_policy(child, int(child_seed))


def apply_policy(policy: A.Compose | None, image: np.ndarray, mask: np.ndarray, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Augment a float32 image in [0, 1] (HxWxC) and its uint8 mask (HxW); with `seed`, the
    draws are reproducible (the caller must not share `policy` between threads then)."""
    if policy is None:
        return image, mask
    if seed is not None:
        seed_policy(policy, seed)
    out = policy(image=image, mask=mask)
    return np.ascontiguousarray(out["image"], np.float32), np.ascontiguousarray(out["mask"], np.uint8)
