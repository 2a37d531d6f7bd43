"""The one definition of how raw pixels become model input, for training and serving alike.

Every consumer calls these functions: the Trainer's input pipeline, the TFT analysis,
the SavedModel's serving signatures, the harness that feeds TFLite exports, and the
Evaluator. Two copies of this logic drifted apart once (16-bit images were scaled by
1/65535 in training and 1/255 in serving), so there is exactly one.

Units: pixels stay in *raw counts* (the numbers stored in the file: 0..255 for 8-bit,
0..65535 for 16-bit) until `scale_pixels` divides them by the dataset's `value_max`,
the top of its value range as recorded in the schema (255 for 8-bit data, and also for
8-bit data stored in 16-bit files; 4095 for a 12-bit camera; 65535 for full 16-bit).
So a narrow-range dataset reaches [0, 1] like any other, and the TFT statistics are
computed on values of a sensible spread.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from segflow.io import read_json, write_json

PIXELS_FILE = "pixels.json"
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, as OpenCV and Pillow convert colour to grey


@dataclass(frozen=True)
class PixelSpec:
    """What the model was trained on: the raw dtype (`serving_default` takes it) and the
    top of the value range (raw counts divided by it give [0, 1])."""

    input_dtype: str  # "uint8" or "uint16"
    value_max: float

    def __post_init__(self) -> None:
        if self.input_dtype not in ("uint8", "uint16"):
            raise ValueError(f"input_dtype must be uint8 or uint16, not {self.input_dtype!r}")
        if self.value_max <= 0:
            raise ValueError(f"value_max must be positive, not {self.value_max}")

    @classmethod
    def from_domain(cls, max_bit_depth: int, value_max: int) -> "PixelSpec":
        return cls("uint16" if max_bit_depth > 8 else "uint8", float(value_max))

    def save(self, directory: str | os.PathLike[str]) -> None:
        write_json(os.path.join(directory, PIXELS_FILE), {"input_dtype": self.input_dtype, "value_max": self.value_max})

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "PixelSpec":
        raw: dict[str, Any] = read_json(os.path.join(directory, PIXELS_FILE))
        return cls(raw["input_dtype"], float(raw["value_max"]))


def to_model_channels(pixels: tf.Tensor, channels: int) -> tf.Tensor:
    """Float [..., H, W, C] with C in 1..4 -> [..., H, W, channels]: alpha is dropped, grey is
    repeated to colour, colour becomes luma. C may be unknown until run time."""
    source = tf.shape(pixels)[-1]
    colour = pixels[..., :3]
    if channels == 3:
        converted = tf.cond(source < 3, lambda: tf.repeat(pixels[..., :1], 3, axis=-1), lambda: colour)
    else:
        converted = tf.cond(source < 3, lambda: pixels[..., :1], lambda: luma(colour))
    return tf.ensure_shape(converted, pixels.shape[:-1].concatenate([channels]))


def luma(colour: tf.Tensor) -> tf.Tensor:
    """Float [..., 3] colour -> [..., 1] grey, BT.601 weights."""
    return tf.reduce_sum(colour * tf.constant(LUMA_WEIGHTS, colour.dtype), axis=-1, keepdims=True)


def resize_to_model(pixels: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Float pixels to the model size; antialiasing keeps thin structures when shrinking."""
    return tf.image.resize(pixels, [height, width], method="bilinear", antialias=True)


def resize_back(probabilities: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Model-size probabilities back to an image's own size (masks are scored there)."""
    return tf.image.resize(probabilities, size, method="bilinear")


def model_pixels(images: tf.Tensor, shape: tuple[int, int, int] | list[int]) -> tf.Tensor:
    """Raw images [B,H,W,C] (uint8, uint16 or float raw counts; any size and channel count)
    -> float32 raw counts [B,h,w,c] at the model's size and channels: what the
    `fixed_size` signature and every export take."""
    height, width, channels = shape
    return resize_to_model(to_model_channels(tf.cast(images, tf.float32), channels), height, width)


def scale_pixels(pixels: tf.Tensor, value_max: float) -> tf.Tensor:
    """Raw counts -> [0, 1] by the dataset's value range; augmentation and TFT see this."""
    return pixels / tf.constant(value_max, tf.float32)


def model_pixels_numpy(image: Any, shape: tuple[int, int, int] | list[int]) -> Any:
    """`model_pixels` for one HxWxC numpy image -> [1,h,w,c] float32 numpy (export harnesses, TFT)."""
    return model_pixels(tf.constant(image)[None], shape).numpy()
