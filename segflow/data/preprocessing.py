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

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import tensorflow as tf

from segflow.utils.io import read_json, write_json

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


def resize_pixels(pixels: tf.Tensor, size: Any, interpolation: str = "bilinear") -> tf.Tensor:
    """Float pixels [..., H, W, C] to `size`; antialiasing keeps thin structures when shrinking
    (tf.image.resize ignores it for `area`, and `nearest` must not blend)."""
    return tf.image.resize(pixels, size, method=interpolation, antialias=interpolation != "nearest")


def resize_back(probabilities: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Model-size probabilities back to an image's own size (masks are scored there)."""
    return tf.image.resize(probabilities, size, method="bilinear")


def fitted_size(size: tf.Tensor, shape: tuple[int, int, int] | list[int]) -> tf.Tensor:
    """`resize_with_pad`: [h, w] int32 of an image of `size` [H, W] scaled to fit the model,
    aspect ratio kept; the rest of the model input (bottom and right) is padding."""
    height, width = float(shape[0]), float(shape[1])
    size = tf.cast(size, tf.float32)
    scale = tf.minimum(height / size[0], width / size[1])
    return tf.clip_by_value(tf.cast(tf.round(size * scale), tf.int32), 1, tf.constant([int(height), int(width)]))


def model_pixels(
    images: tf.Tensor, shape: tuple[int, int, int] | list[int], resize: str = "resize", interpolation: str = "bilinear"
) -> tf.Tensor:
    """Raw images [B,H,W,C] (uint8, uint16 or float raw counts; any size and channel count)
    -> float32 raw counts with the model's channels: at the model's size (`resize`, what the
    `fixed_size` signature and every export take), fitted into it with zero padding at the
    bottom and right (`resize_with_pad`), or at their own size (`none`: the model sees tiles)."""
    height, width, channels = shape
    pixels = to_model_channels(tf.cast(images, tf.float32), channels)
    if resize == "none":
        return pixels
    if resize == "resize":
        return resize_pixels(pixels, [height, width], interpolation)
    fitted = fitted_size(tf.shape(images)[1:3], shape)
    inside = resize_pixels(pixels, fitted, interpolation)
    padded = tf.pad(inside, [[0, 0], [0, height - fitted[0]], [0, width - fitted[1]], [0, 0]])
    return tf.ensure_shape(padded, [None, height, width, channels])


def mirror_pad(pixels: tf.Tensor, height: Any, width: Any) -> tf.Tensor:
    """[B,H,W,C] -> [B,height,width,C] (height >= H, width >= W), the image mirrored at its
    bottom and right edges as often as needed (so also when it is smaller than a tile)."""

    def mirrored(size: tf.Tensor, length: Any) -> tf.Tensor:
        position = tf.range(length) % (2 * size)
        return tf.where(position < size, position, 2 * size - 1 - position)

    shape = tf.shape(pixels)
    return tf.gather(tf.gather(pixels, mirrored(shape[1], height), axis=1), mirrored(shape[2], width), axis=2)


def blend_window(tile: tuple[int, int]) -> tf.Tensor:
    """[h, w] Hann window: tiles half a tile apart sum to exactly 1 inside the image, so the
    blend has no seams, and each tile's border (where its convolutions saw padding) weighs least."""
    rows, cols = (tf.sin(math.pi * (tf.range(size, dtype=tf.float32) + 0.5) / size) ** 2 for size in tile)
    return rows[:, None] * cols[None, :]


def _overlap_add(tiles: tf.Tensor, tile: tuple[int, int]) -> tf.Tensor:
    """[B, R, C, h, w, K] tiles laid half a tile apart -> their sum [B, (R+1)*h/2, (C+1)*w/2, K]:
    each tile's four quarters land on four cells of a half-tile grid."""
    half_h, half_w = tile[0] // 2, tile[1] // 2
    batch, rows, cols, classes = (tf.shape(tiles)[axis] for axis in (0, 1, 2, 5))
    quarters = tf.reshape(tiles, [batch, rows, cols, 2, half_h, 2, half_w, classes])
    total = tf.add_n([
        tf.pad(quarters[:, :, :, down, :, right], [[0, 0], [down, 1 - down], [right, 1 - right], [0, 0], [0, 0], [0, 0]])
        for down in (0, 1) for right in (0, 1)
    ])
    return tf.reshape(tf.transpose(total, [0, 1, 3, 2, 4, 5]), [batch, (rows + 1) * half_h, (cols + 1) * half_w, classes])


def tiled_probabilities(predict: Callable[[tf.Tensor], tf.Tensor], pixels: tf.Tensor, tile: tuple[int, int]) -> tf.Tensor:
    """Probabilities [B,H,W,K] of images of any size [B,H,W,C] from a model-size predictor
    (tiles [N,h,w,C] -> [N,h,w,K]): tiles half a tile apart, mirrored past the bottom and
    right edges, blended with `blend_window`. Graph ops only, so `serving_default` of a
    model trained on crops at native resolution runs it, and the exports' checks call it
    eagerly with their runtime's predictor. Tile sides must be even."""
    height, width = tile
    size = tf.shape(pixels)
    rows = 1 + tf.maximum(0, -(-(size[1] - height) // (height // 2)))
    cols = 1 + tf.maximum(0, -(-(size[2] - width) // (width // 2)))
    padded = mirror_pad(pixels, (rows + 1) * (height // 2), (cols + 1) * (width // 2))
    patches = tf.image.extract_patches(padded, [1, height, width, 1], [1, height // 2, width // 2, 1], [1, 1, 1, 1], "VALID")
    probabilities = predict(tf.reshape(patches, [-1, height, width, pixels.shape[-1]]))
    window = blend_window(tile)[..., None]
    classes = tf.shape(probabilities)[-1]
    blended = _overlap_add(tf.reshape(probabilities * window, [size[0], rows, cols, height, width, classes]), tile)
    weights = _overlap_add(tf.broadcast_to(window, [1, rows, cols, height, width, 1]), tile)
    return (blended / weights)[:, : size[1], : size[2]]


def image_probabilities(
    predict: Callable[[tf.Tensor], tf.Tensor], images: tf.Tensor, shape: tuple[int, int, int] | list[int], resize: str = "resize", interpolation: str = "bilinear"
) -> tf.Tensor:
    """Probabilities [B,H,W,K] at the images' own size from a model-size predictor of raw
    counts ([N,h,w,c] float32 -> [N,h,w,K]), by how the model was trained (`resize`): the
    one path of `serving_default`, the exports' checks and the evaluator."""
    size = tf.shape(images)[1:3]
    pixels = model_pixels(images, shape, resize, interpolation)
    if resize == "none":
        return tiled_probabilities(predict, pixels, (shape[0], shape[1]))
    probabilities = predict(pixels)
    if resize == "resize_with_pad":
        fitted = fitted_size(size, shape)
        probabilities = probabilities[:, : fitted[0], : fitted[1]]
    return resize_back(probabilities, size)


def scale_pixels(pixels: tf.Tensor, value_max: float) -> tf.Tensor:
    """Raw counts -> [0, 1] by the dataset's value range; augmentation and TFT see this."""
    return pixels / tf.constant(value_max, tf.float32)


def model_pixels_numpy(image: Any, shape: tuple[int, int, int] | list[int]) -> Any:
    """The whole image resized to the model size, [1,h,w,c] float32 numpy: TFT's statistics
    (whatever the training's `resize`: the pixels' distribution, not their geometry) and the
    calibration and parity inputs of the exports, which take the model size."""
    return model_pixels(tf.constant(image)[None], shape).numpy()


def effective_value_max(max_pixel_value: int) -> int:
    """The smallest 2^k - 1 (k >= 8) that holds `max_pixel_value`: 8-bit data, also when stored
    in 16-bit files, gives 255, a 12-bit camera 4095, full 16-bit data 65535."""
    return max(255, (1 << int(max_pixel_value).bit_length()) - 1)


RAW_FEATURE = "image"


TRANSFORMED_FEATURE = "image_xf"
