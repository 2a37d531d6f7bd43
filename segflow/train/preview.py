"""`segflow preview CONFIG`: what the trainer's augmentation does to the data, before training.

The examples are the train split's (decided as ExampleGen decides it), decoded with
segflow.utils.io, mapped to class ids, brought to the model size and [0, 1] as the trainer's input
pipeline does, and augmented by the same policy with the same per-example, per-epoch seeds.
Each cell shows the augmented image and the image with its augmented mask overlaid (ignored
pixels white); beside the PNG goes the resolved policy (albumentations' to_dict) as JSON.
The trainer writes the same grid of the train split it reads into its run artifact
(`model_run/augmentation/preview.png`), so every pipeline run keeps a picture of its policy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from segflow.config.experiment import ExperimentConfig, PatchesConfig
from segflow.utils.errors import ConfigError

# Overlay colours of class ids 1, 2, ... (class 0, background, is not tinted).
PALETTE = np.array(
    [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230)], np.float32
)
IGNORED_COLOUR = np.array((255, 255, 255), np.float32)
GAP = 4
CAPTION = 12


def _examples(config: ExperimentConfig, count: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(file name, raw image, class-id mask) of up to `count` train examples, in stem order;
    files that ExampleGen would quarantine are left out."""
    from segflow.data.examples import assign_splits
    from segflow.data.sources import label_lookup, pair_files
    from segflow.utils import storage
    from segflow.utils.io import ImageReadError, decode_image, decode_mask

    pairs, _, _ = pair_files(config.dataset.images, config.dataset.masks)
    if not pairs:
        raise ConfigError(f"no image/mask pairs in {config.dataset.images} and {config.dataset.masks}")
    hash_split = len(pairs) > 1 and config.dataset.eval is None and config.dataset.folds is None  # else every pair of images/masks trains
    splits = assign_splits([stem for stem, _, _ in pairs], config.dataset.eval_share, config.dataset.group_by, config.dataset.assignment == "stable") if hash_split else {}
    table = label_lookup(config.num_labels, config.mask_values, config.ignore_index)
    found = []
    for stem, image_path, mask_path in pairs:
        if splits.get(stem, "train") != "train":
            continue
        try:
            image = decode_image(storage.read_bytes(image_path), image_path)
            mask = table[decode_mask(storage.read_bytes(mask_path), mask_path)]
        except (ImageReadError, OSError):
            continue
        if mask.shape != image.shape[:2] or (mask < 0).any():
            continue
        found.append((storage.basename(image_path), image, mask.astype(np.uint8)))
        if len(found) == count:
            break
    if not found:
        raise ConfigError(f"no usable train examples in {config.dataset.images} (see `segflow validate`)")
    return found


def _model_input(settings: "PreviewSettings", image: np.ndarray, mask: np.ndarray, value_max: float, seed: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The trainer's decode step (model channels, [0, 1] by the value range, the mask as the
    model is trained on it) and, with `patches.resize` none, a crop drawn as the trainer does."""
    import tensorflow as tf

    from segflow.data.patches import CropPlan, model_mask, sample_crop
    from segflow.data.preprocessing import model_pixels

    patches = settings.patches
    pixels = model_pixels(tf.constant(image[None]), settings.shape, patches.resize, patches.interpolation)[0] / value_max
    labels = model_mask(tf.constant(mask[..., None]), settings.shape, patches.resize, settings.ignore_index)
    if patches.resize == "none":
        tile = (settings.shape[0], settings.shape[1])
        pixels, labels = sample_crop(pixels, labels, tf.constant(seed, tf.int64), tile, CropPlan(patches.positive_share), settings.ignore_index)
    return pixels.numpy().astype(np.float32), labels.numpy().astype(np.uint8)


def _overlay(image: np.ndarray, mask: np.ndarray, ignore_index: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(the image, the image with class colours blended in) as uint8 RGB."""
    rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
    rgb = np.clip(rgb * 255.0, 0, 255)
    colours = np.zeros_like(rgb)
    tinted = mask > 0
    colours[tinted] = PALETTE[(mask[tinted].astype(int) - 1) % len(PALETTE)]
    if ignore_index is not None:
        colours[mask == ignore_index] = IGNORED_COLOUR
    blended = np.where(tinted[..., None], 0.45 * rgb + 0.55 * colours, rgb)
    return rgb.astype(np.uint8), blended.astype(np.uint8)


def write_preview(config: ExperimentConfig, output: str | os.PathLike[str], count: int = 8) -> dict[str, Any]:
    """The grid of the first train examples of the dataset folders (what `segflow preview`
    shows before any run): see `write_grid`."""
    if count < 1:
        raise ConfigError(f"preview: -n must be at least 1, got {count}")
    return write_grid(PreviewSettings.of(config), _examples(config, count), output, count)


@dataclass(frozen=True)
class PreviewSettings:
    """The config keys a preview reads (the trainer has these, not the dataset folders)."""

    augmentation: dict[str, Any] | list[Any]
    ignore_index: int | None
    shape: list[int]
    seed: int
    patches: PatchesConfig = PatchesConfig()

    @classmethod
    def of(cls, config: ExperimentConfig) -> "PreviewSettings":
        return cls(config.augmentation, config.ignore_index, config.shape, config.seed, config.patches)


def write_grid(settings: PreviewSettings, examples: list[tuple[str, np.ndarray, np.ndarray]], output: str | os.PathLike[str], count: int) -> dict[str, Any]:
    """Write the grid PNG of `count` cells (image, and image with the augmented mask
    blended in) at `output` and `<stem>.policy.json` beside it; return both paths. Fewer
    examples than cells: later cells show the same examples in later epochs."""
    from segflow.data.augment import (
        apply_policy,
        build_policy,
        example_seed,
        policy_dict,
    )
    from segflow.data.preprocessing import effective_value_max
    from segflow.utils.io import write_json

    value_max = float(effective_value_max(max(int(image.max()) for _, image, _ in examples)))
    policy = build_policy(settings.augmentation, ignore_index=settings.ignore_index)
    height, width, _ = settings.shape
    columns = min(count, max(1, int(np.ceil(np.sqrt(count)))))
    rows = -(-count // columns)
    cell_width, cell_height = 2 * width + GAP, height + CAPTION
    grid = Image.new("RGB", (columns * (cell_width + GAP) - GAP, rows * (cell_height + GAP) - GAP), (32, 32, 32))
    draw = ImageDraw.Draw(grid)
    for index in range(count):
        filename, image, mask = examples[index % len(examples)]
        epoch = index // len(examples)
        seed = example_seed(settings.seed, epoch, filename)
        pixels, labels = _model_input(settings, image, mask, value_max, (seed, settings.seed))
        pixels, labels = apply_policy(policy, pixels, labels, seed)
        plain, overlaid = _overlay(pixels, labels, settings.ignore_index)
        left, top = (index % columns) * (cell_width + GAP), (index // columns) * (cell_height + GAP)
        grid.paste(Image.fromarray(plain), (left, top + CAPTION))
        grid.paste(Image.fromarray(overlaid), (left + width + GAP, top + CAPTION))
        draw.text((left, top), f"{filename} epoch {epoch}", fill=(220, 220, 220))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    grid.save(output, format="PNG")
    policy_path = output.with_suffix(".policy.json")
    write_json(policy_path, policy_dict(policy))
    return {"grid": str(output), "policy": str(policy_path), "examples": min(count, len(examples))}
