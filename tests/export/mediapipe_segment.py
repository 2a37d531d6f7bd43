"""Runs MediaPipe Tasks' Python ImageSegmenter on a TFLite model as an app would: the model
file and its metadata only, no segflow code. It runs in its own environment (.venv-mediapipe,
`make test-mediapipe`: MediaPipe needs absl-py 2, the training stack pins 1.x), so it imports
nothing from segflow; tests/export/test_mediapipe.py calls it through a subprocess.

Usage: python tests/export/mediapipe_segment.py MODEL.tflite OUT_DIR IMAGE...
Writes OUT_DIR/<image stem>.npy (the category mask, uint8 [H,W]) per image and prints one
JSON line: {"labels": [...], "masks": {image: npy path}}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import mediapipe as mp
import numpy as np
from mediapipe.tasks.python import BaseOptions, vision
from PIL import Image


def segment(model: Path, out: Path, images: list[Path]) -> dict[str, object]:
    options = vision.ImageSegmenterOptions(
        base_options=BaseOptions(model_asset_path=str(model)), output_category_mask=True, output_confidence_masks=False
    )
    masks: dict[str, str] = {}
    with vision.ImageSegmenter.create_from_options(options) as segmenter:
        for path in images:
            pixels = np.asarray(Image.open(path).convert("RGB"))
            result = segmenter.segment(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(pixels)))
            target = out / f"{path.stem}.npy"
            mask = result.category_mask.numpy_view()  # [H,W,1]
            np.save(target, mask.reshape(mask.shape[:2]).astype(np.uint8))
            masks[str(path)] = str(target)
        labels = list(segmenter.labels)
    return {"labels": labels, "masks": masks}


def main(arguments: list[str]) -> None:
    model, out, *images = arguments
    Path(out).mkdir(parents=True, exist_ok=True)
    print(json.dumps(segment(Path(model), Path(out), [Path(image) for image in images])))


if __name__ == "__main__":
    main(sys.argv[1:])
