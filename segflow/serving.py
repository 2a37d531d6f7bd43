"""The served model: TFT normalisation + network + resizing in one SavedModel.

Signatures:
- `serving_default`: uint8 images [B,H,W,C] of any size -> `mask` [B,H,W] uint8 and
  `probabilities` [B,H,W,K] at the input size. Callers send raw pixels, nothing else.
- `fixed_size`: float32 pixels in [0,1] at the model size [B,h,w,c] -> probabilities at
  the model size. The TFLite exports are converted from this one, since mobile
  runtimes want static shapes; `predict_image` wraps the resizing around it.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from segflow.examples import pixel_scale
from segflow.io import read_json, write_json

SERVING_SUBDIR = "Format-Serving"
SPEC_FILE = "serving_spec.json"

FixedSizePredictor = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ServingSpec:
    shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    sigmoid: bool
    ignore_index: int | None

    def save(self, directory: str | os.PathLike[str]) -> None:
        write_json(Path(directory) / SPEC_FILE, asdict(self))

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "ServingSpec":
        raw = read_json(Path(directory) / SPEC_FILE)
        return cls(shape=tuple(raw["shape"]), class_names=tuple(raw["class_names"]), sigmoid=raw["sigmoid"], ignore_index=raw["ignore_index"])


def resize_to_model(pixels: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Float pixels to the model size; antialiasing keeps thin structures when shrinking."""
    return tf.image.resize(pixels, [height, width], method="bilinear", antialias=True)


def resize_back(probabilities: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    return tf.image.resize(probabilities, size, method="bilinear")


class SegmentationServer(tf.Module):
    """Keeps the Keras network and the TFT layer tracked so that both are saved."""

    def __init__(self, network: Any, transform_layer: Any, spec: ServingSpec) -> None:
        super().__init__()
        self.network = network
        self.transform_layer = transform_layer
        self.spec = spec
        height, width, channels = spec.shape
        self.fixed_size = tf.function(self._fixed_size, input_signature=[tf.TensorSpec([None, height, width, channels], tf.float32, name="pixels")])
        self.serve = tf.function(self._serve, input_signature=[tf.TensorSpec([None, None, None, channels], tf.uint8, name="images")])

    def _fixed_size(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        from segflow.components.transform.core import RAW_FEATURE, TRANSFORMED_FEATURE
        from segflow.losses import probabilities

        normalized = self.transform_layer({RAW_FEATURE: pixels})[TRANSFORMED_FEATURE]
        logits = self.network(normalized, training=False)
        return {"probabilities": probabilities(logits, self.spec.sigmoid)}

    def _serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        height, width, _ = self.spec.shape
        pixels = resize_to_model(tf.cast(images, tf.float32) / 255.0, height, width)
        probs = resize_back(self._fixed_size(pixels)["probabilities"], tf.shape(images)[1:3])
        return {"mask": tf.cast(tf.argmax(probs, axis=-1), tf.uint8), "probabilities": probs}

    def save(self, model_dir: str | os.PathLike[str]) -> Path:
        target = Path(model_dir) / SERVING_SUBDIR
        tf.saved_model.save(self, str(target), signatures={"serving_default": self.serve, "fixed_size": self.fixed_size})
        self.spec.save(target)
        return target


def model_input(image: np.ndarray, bit_depth: int, shape: tuple[int, int, int] | list[int]) -> np.ndarray:
    """A raw HxWxC image as the `fixed_size` signature takes it: [1,h,w,c] float32 in [0,1],
    model channels, model size, resized as `serving_default` and the trainer do it."""
    from segflow.io import convert_channels

    height, width, channels = shape
    pixels = convert_channels(image, channels).astype(np.float32)[None] / pixel_scale(bit_depth)
    return resize_to_model(tf.constant(pixels), height, width).numpy()


def predict_image(fixed_size: FixedSizePredictor, image: np.ndarray, bit_depth: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Class ids [H,W] at the image's own size, via a model-size predictor (SavedModel or TFLite),
    so that every export is evaluated alike."""
    probs = resize_back(tf.constant(fixed_size(model_input(image, bit_depth, shape))), image.shape[:2]).numpy()
    return probs[0].argmax(axis=-1).astype(np.uint8)


def saved_model_predictor(serving_dir: str | os.PathLike[str]) -> FixedSizePredictor:
    loaded = tf.saved_model.load(str(serving_dir))
    signature = loaded.signatures["fixed_size"]

    def predict(pixels: np.ndarray) -> np.ndarray:
        return signature(pixels=tf.constant(pixels, tf.float32))["probabilities"].numpy()

    predict.keepalive = loaded  # the signature needs its SavedModel object alive
    return predict
