"""A dataset's files as the user keeps them: which image pairs with which mask, what is quarantined and
why, and how raw mask values map to class ids. ExampleGen and the preview read data through these."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from segflow.utils import storage
from segflow.utils.io import IMAGE_SUFFIXES


def _listing(folder: str | os.PathLike[str], skipped: list[dict[str, Any]]) -> dict[str, list[str]]:
    """File locations (paths or URIs) by stem; hidden entries and subfolders are appended to
    `skipped` with a reason."""
    try:
        entries = storage.list_folder(folder)
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: not a folder (check dataset.images / dataset.masks)") from None
    stems: dict[str, list[str]] = {}
    for entry in entries:
        if entry.name.startswith("."):
            reason = "hidden entry (name starts with '.')"
        elif entry.is_dir:
            reason = "not a file (subfolders are not read)"
        else:
            stems.setdefault(Path(entry.name).stem, []).append(entry.location)
            continue
        skipped.append({"file": entry.location, "reason": reason, "skipped": True})
    return stems


def _suffix(location: str) -> str:
    return Path(storage.basename(location)).suffix


def pair_files(
    images_dir: str | os.PathLike[str], masks_dir: str | os.PathLike[str]
) -> tuple[list[tuple[str, str, str]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(stem, image, mask) pairs, quarantine entries for files that cannot be paired, and the
    skipped entries (hidden files and subfolders: not examples)."""
    quarantined: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    images, masks = _listing(images_dir, skipped), _listing(masks_dir, skipped)
    pairs = []

    def usable(stem: str, paths: list[str], role: str) -> str | None:
        supported = [path for path in paths if _suffix(path).lower() in IMAGE_SUFFIXES]
        for path in paths:
            if _suffix(path).lower() not in IMAGE_SUFFIXES:
                quarantined.append({"file": str(path), "reason": f"unsupported file type {_suffix(path) or '(none)'!r}"})
        if len(supported) > 1:
            for path in supported:
                quarantined.append({"file": str(path), "reason": f"several {role} files share the stem {stem!r}"})
            return None
        return supported[0] if supported else None

    for stem in sorted(set(images) | set(masks)):
        image = usable(stem, images.get(stem, []), "image")
        mask = usable(stem, masks.get(stem, []), "mask")
        if image and mask:
            pairs.append((stem, str(image), str(mask)))
        elif image and stem not in masks:
            quarantined.append({"file": str(image), "reason": f"no mask with stem {stem!r} in {masks_dir}"})
        elif mask and stem not in images:
            quarantined.append({"file": str(mask), "reason": f"no image with stem {stem!r} in {images_dir}"})
        elif image or mask:  # the partner exists but was quarantined above
            quarantined.append({"file": str(image or mask), "reason": f"its partner file for stem {stem!r} is unusable"})
    return pairs, quarantined, skipped


def label_lookup(num_labels: int, mask_values: Sequence[int] | None, ignore_index: int | None) -> np.ndarray:
    """Raw mask value -> class id (uint8), 65536 entries; -1 marks values that are not allowed.
    Without `mask_values` the raw values are the class ids 0..num_labels-1."""
    table = np.full(65536, -1, np.int32)
    if mask_values is None:
        table[:num_labels] = np.arange(num_labels)
    else:
        table[np.array(mask_values)] = np.arange(num_labels)
    if ignore_index is not None:
        table[ignore_index] = ignore_index
    return table
