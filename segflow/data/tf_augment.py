"""TensorFlow versions of albumentations transforms, run as ops inside the tf.data graph.

albumentations runs per image in numpy through `tf.numpy_function`, which holds the GIL: on
2 cores that capped the trainer's augmented stream below half of what decoding alone gives
(benchmarks/README.md, input pipeline). When every entry of a policy has a TF version here,
the trainer runs the policy as TF ops instead, in parallel and without Python.

The policy is still the YAML one built by `segflow.data.augment.build_policy`: each TF transform
reads its parameters from the built albumentations transform, so validation, aliases (FlipLR,
ZoomIn, Contrast...), defaults (Affine's mirrored border) and the mask fill (ignore_index) are
the same objects. Semantics follow albumentations 2.0.8 on float32 images in [0, 1]; the
draws come from stateless random ops seeded by (seed, epoch, file name), so a stream is
deterministic, but an example's draws differ from the ones albumentations would make.
TF_TRANSFORMS maps albumentations class names to their TF versions; a policy with any other
entry (or a parameter value a TF version does not cover) stays on albumentations.
"""
from __future__ import annotations

import math
from typing import Any

import albumentations as A
import cv2
import tensorflow as tf

from segflow.utils.registry import Registry
from segflow.utils.runtime import log

Params = dict[str, tf.Tensor]
Shape = tuple[int, int, int]

TF_TRANSFORMS: Registry = Registry("TF augmentation", "segflow.data.tf_augment")

# OpenCV's warpAffine looks up source coordinates on a 1/32 pixel grid (INTER_BITS 5); the
# same grid here keeps bilinear results equal to albumentations' to float rounding.
_SUBPIXELS = 32.0
# cv2.COLOR_RGB2GRAY, which albumentations' colour functions use for the grey image.
_GREY_WEIGHTS = (0.299, 0.587, 0.114)
# Stateless draws pinned to Philox: left to auto-select, XLA (which compiles the policy) and
# the TF kernels could pick different generators and give different draws.
_ALGORITHM = "philox"
_BORDERS = frozenset({cv2.BORDER_CONSTANT, cv2.BORDER_REPLICATE, cv2.BORDER_REFLECT, cv2.BORDER_REFLECT_101, cv2.BORDER_WRAP})


class Unsupported(ValueError):
    """A transform's parameters have no TF version: the policy stays on albumentations."""


class TFTransform:
    """One albumentations transform as TF ops: `sample` draws its parameters from a
    stateless seed, `apply` is the deterministic part, so tests can compare `apply` with
    albumentations' own `apply` on the same parameters."""

    def __init__(self, transform: A.BasicTransform, shape: Shape) -> None:
        self.p = float(transform.p)
        self.shape = shape

    def sample(self, seed: tf.Tensor) -> Params:
        return {}

    def apply(self, image: tf.Tensor, mask: tf.Tensor, params: Params) -> tuple[tf.Tensor, tf.Tensor]:
        raise NotImplementedError

    def __call__(self, image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Apply with probability p, as albumentations does."""
        gate, draws = tf.unstack(tf.random.experimental.stateless_split(seed, 2, alg=_ALGORITHM))
        if self.p >= 1.0:
            return self.apply(image, mask, self.sample(draws))
        fire = tf.random.stateless_uniform([], gate, alg=_ALGORITHM) < self.p
        return tf.cond(fire, lambda: self.apply(image, mask, self.sample(draws)), lambda: (image, mask))


def _uniform(seed: tf.Tensor, bounds: tuple[float, float]) -> tf.Tensor:
    """Python's random.uniform(a, b), as albumentations draws its ranges (float64)."""
    low, high = float(bounds[0]), float(bounds[1])
    return low + (high - low) * tf.random.stateless_uniform([], seed, dtype=tf.float64, alg=_ALGORITHM)


def _seeds(seed: tf.Tensor, count: int) -> list[tf.Tensor]:
    return tf.unstack(tf.random.experimental.stateless_split(seed, count, alg=_ALGORITHM))


@TF_TRANSFORMS.register("HorizontalFlip")
class HorizontalFlip(TFTransform):
    """Mirror left-right (image and mask)."""

    def apply(self, image: tf.Tensor, mask: tf.Tensor, params: Params) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.reverse(image, [1]), tf.reverse(mask, [1])


@TF_TRANSFORMS.register("VerticalFlip")
class VerticalFlip(TFTransform):
    """Mirror top-bottom (image and mask)."""

    def apply(self, image: tf.Tensor, mask: tf.Tensor, params: Params) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.reverse(image, [0]), tf.reverse(mask, [0])


def _border_index(index: tf.Tensor, size: int, border_mode: int) -> tf.Tensor:
    """OpenCV's borderInterpolate: where an index outside [0, size) reads from."""
    if border_mode == cv2.BORDER_REPLICATE:
        return tf.clip_by_value(index, 0, size - 1)
    if border_mode == cv2.BORDER_WRAP:
        return tf.math.floormod(index, size)
    if border_mode == cv2.BORDER_REFLECT:  # fedcba|abcdefgh|hgfedcb
        folded = tf.math.floormod(index, 2 * size)
        return tf.where(folded >= size, 2 * size - 1 - folded, folded)
    if border_mode == cv2.BORDER_REFLECT_101 and size > 1:  # gfedcb|abcdefgh|gfedcba
        folded = tf.math.floormod(index, 2 * size - 2)
        return tf.where(folded >= size, 2 * size - 2 - folded, folded)
    return tf.clip_by_value(index, 0, size - 1)  # constant: clamped here, replaced by the fill after


def _read(flat: tf.Tensor, cols: tf.Tensor, rows: tf.Tensor, height: int, width: int, border_mode: int, fill: tf.Tensor) -> tf.Tensor:
    """Pixels at integer (col, row) of an image flattened to (height x width, channels)."""
    values = tf.gather(flat, _border_index(rows, height, border_mode) * width + _border_index(cols, width, border_mode))
    if border_mode != cv2.BORDER_CONSTANT:
        return values
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    return tf.where(inside[..., None], values, fill)


def warp_affine(array: tf.Tensor, matrix: tf.Tensor, nearest: bool, border_mode: int, fill: float | tuple[float, ...]) -> tf.Tensor:
    """cv2.warpAffine of an HxWxC array with a forward 3x3 matrix (output pixel (x, y)
    reads the input at matrix^-1 (x, y)): nearest (round half up) or bilinear on OpenCV's
    1/32 grid, every OpenCV border mode, `fill` for a constant border."""
    height, width, channels = array.shape
    forward = tf.cast(matrix, tf.float64)
    linear = tf.linalg.inv(forward[:2, :2])
    offset = -tf.linalg.matvec(linear, forward[:2, 2])
    inverse = tf.cast(tf.concat([linear, offset[:, None]], axis=1), tf.float32)  # float32 per pixel: 2e-5 px at 512
    rows, cols = tf.meshgrid(tf.range(height, dtype=tf.float32), tf.range(width, dtype=tf.float32), indexing="ij")
    source_x = inverse[0, 0] * cols + inverse[0, 1] * rows + inverse[0, 2]
    source_y = inverse[1, 0] * cols + inverse[1, 1] * rows + inverse[1, 2]
    flat = tf.reshape(array, [height * width, channels])
    fill_values = tf.broadcast_to(tf.cast(tf.constant(fill, tf.float64), array.dtype), [channels])
    if nearest:
        x, y = (tf.cast(tf.floor(value + 0.5), tf.int32) for value in (source_x, source_y))
        out = _read(flat, x, y, height, width, border_mode, fill_values)
    else:
        source_x, source_y = (tf.floor(value * _SUBPIXELS + 0.5) / _SUBPIXELS for value in (source_x, source_y))
        left, top = tf.floor(source_x), tf.floor(source_y)
        across, down = (tf.cast(value, array.dtype)[..., None] for value in (source_x - left, source_y - top))
        x0, y0 = tf.cast(left, tf.int32), tf.cast(top, tf.int32)

        def at(dx: int, dy: int) -> tf.Tensor:
            return _read(flat, x0 + dx, y0 + dy, height, width, border_mode, fill_values)

        upper = at(0, 0) * (1 - across) + at(1, 0) * across
        lower = at(0, 1) * (1 - across) + at(1, 1) * across
        out = upper * (1 - down) + lower * down
    return tf.reshape(out, [height, width, channels])


def affine_matrix(translate: tuple[tf.Tensor, tf.Tensor], shear: tuple[tf.Tensor, tf.Tensor], scale: tuple[tf.Tensor, tf.Tensor], rotate: tf.Tensor, shape: Shape) -> tf.Tensor:
    """albumentations' create_affine_transformation_matrix (float64, angles in degrees),
    about the image centre (width / 2 - 0.5, height / 2 - 0.5)."""
    centre_x, centre_y = shape[1] / 2 - 0.5, shape[0] / 2 - 0.5
    angle = tf.math.floormod(rotate, 360.0) * (math.pi / 180.0)
    cos, sin = tf.cos(angle), tf.sin(angle)
    tan_x, tan_y = (tf.tan(value * (math.pi / 180.0)) for value in shear)
    one, zero = tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)

    def matrix(*rows: tuple[Any, Any, Any]) -> tf.Tensor:
        return tf.stack([tf.stack([tf.cast(v, tf.float64) for v in row]) for row in (*rows, (zero, zero, one))])

    to_corner = matrix((one, zero, -centre_x), (zero, one, -centre_y))
    scaling = matrix((scale[0], zero, zero), (zero, scale[1], zero))
    rotation = matrix((cos, sin, zero), (-sin, cos, zero))
    shearing = matrix((one, tan_x, zero), (tan_y, one, zero))
    translation = matrix((one, zero, translate[0]), (zero, one, translate[1]))
    to_centre = matrix((one, zero, centre_x), (zero, one, centre_y))
    return to_centre @ translation @ shearing @ rotation @ scaling @ to_corner


@TF_TRANSFORMS.register("Affine")
class Affine(TFTransform):
    """Scale, translate, rotate, shear about the centre: image bilinear or nearest, mask
    nearest, new pixels from the border mode (constant: `fill`, and `fill_mask` in the mask,
    which segflow sets to ignore_index or background)."""

    def __init__(self, transform: A.Affine, shape: Shape) -> None:
        super().__init__(transform, shape)
        if transform.fit_output or transform.balanced_scale:
            raise Unsupported("Affine: fit_output and balanced_scale have no TF version")
        if transform.interpolation not in (cv2.INTER_LINEAR, cv2.INTER_NEAREST) or transform.mask_interpolation != cv2.INTER_NEAREST:
            raise Unsupported("Affine: only linear or nearest interpolation has a TF version")
        if transform.border_mode not in _BORDERS:
            raise Unsupported(f"Affine: border_mode {transform.border_mode} has no TF version")
        self.transform = transform

    def sample(self, seed: tf.Tensor) -> Params:
        """albumentations' draws: translation in whole pixels (percent truncated), shear
        negated, one scale for both axes with keep_ratio."""
        t = self.transform
        height, width = self.shape[:2]
        seeds = _seeds(seed, 7)
        if t.translate_px is not None:
            translate = tuple(
                tf.cast(tf.random.stateless_uniform([], seeds[i], int(t.translate_px[axis][0]), int(t.translate_px[axis][1]) + 1, dtype=tf.int64, alg=_ALGORITHM), tf.float64)
                for i, axis in enumerate("xy")
            )
        elif t.translate_percent is not None:
            translate = tuple(tf.cast(tf.cast(_uniform(seeds[i], t.translate_percent[axis]) * size, tf.int64), tf.float64) for i, (axis, size) in enumerate((("x", width), ("y", height))))
        else:
            translate = (tf.constant(0.0, tf.float64), tf.constant(0.0, tf.float64))
        shear = (-_uniform(seeds[2], t.shear["x"]), -_uniform(seeds[3], t.shear["y"]))
        scale_x = _uniform(seeds[4], t.scale["x"])
        scale = (scale_x, scale_x if t.keep_ratio else _uniform(seeds[5], t.scale["y"]))
        rotate = _uniform(seeds[6], t.rotate)
        return {"matrix": affine_matrix(translate, shear, scale, rotate, self.shape)}

    def apply(self, image: tf.Tensor, mask: tf.Tensor, params: Params) -> tuple[tf.Tensor, tf.Tensor]:
        t = self.transform
        warped = warp_affine(image, params["matrix"], t.interpolation == cv2.INTER_NEAREST, t.border_mode, t.fill)
        warped_mask = warp_affine(mask[..., None], params["matrix"], True, t.border_mode, t.fill_mask)[..., 0]
        return warped, warped_mask


def _grey(image: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(image * tf.constant(_GREY_WEIGHTS, image.dtype), axis=-1, keepdims=True)


def adjust_brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """albumentations' adjust_brightness_torchvision on [0, 1] floats: scale, clip."""
    return tf.clip_by_value(image * factor, 0.0, 1.0)


def adjust_contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with the mean grey level (RGB) or the mean (one channel), clip."""
    mean = tf.reduce_mean(image if image.shape[-1] == 1 else _grey(image))
    return tf.clip_by_value(image * factor + mean * (1.0 - factor), 0.0, 1.0)


def adjust_saturation(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend each pixel with its grey value, clip; one-channel images unchanged."""
    if image.shape[-1] == 1:
        return image
    return tf.clip_by_value(image * factor + _grey(image) * (1.0 - factor), 0.0, 1.0)


def adjust_hue(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Rotate the hue by `factor` turns (albumentations: factor x 360 degrees in HSV)."""
    if image.shape[-1] == 1:
        return image
    return tf.image.adjust_hue(image, factor)


@TF_TRANSFORMS.register("ColorJitter")
class ColorJitter(TFTransform):
    """Brightness, contrast, saturation and hue factors, applied in a random order."""

    def __init__(self, transform: A.ColorJitter, shape: Shape) -> None:
        super().__init__(transform, shape)
        if shape[-1] not in (1, 3):
            raise Unsupported("ColorJitter takes 1- or 3-channel images")
        self.ranges = (transform.brightness, transform.contrast, transform.saturation, transform.hue)

    def sample(self, seed: tf.Tensor) -> Params:
        seeds = _seeds(seed, 5)
        factors = tf.stack([tf.cast(_uniform(s, bounds), tf.float32) for s, bounds in zip(seeds, self.ranges)])
        return {"factors": factors, "order": tf.argsort(tf.random.stateless_uniform([4], seeds[4], alg=_ALGORITHM))}

    def apply(self, image: tf.Tensor, mask: tf.Tensor, params: Params) -> tuple[tf.Tensor, tf.Tensor]:
        functions = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        for position in range(4):
            chosen = params["order"][position]
            image = tf.switch_case(chosen, [lambda f=f, i=i: f(image, params["factors"][i]) for i, f in enumerate(functions)])
            image = tf.ensure_shape(image, self.shape)
        return image, mask


@TF_TRANSFORMS.register("RandomBrightnessContrast")
class RandomBrightnessContrast(TFTransform):
    """image x (1 + contrast) + brightness (x the maximum 1, or x the image mean), clipped."""

    def __init__(self, transform: A.RandomBrightnessContrast, shape: Shape) -> None:
        super().__init__(transform, shape)
        if transform.ensure_safe_range:
            raise Unsupported("RandomBrightnessContrast: ensure_safe_range has no TF version")
        self.transform = transform

    def sample(self, seed: tf.Tensor) -> Params:
        contrast, brightness = _seeds(seed, 2)
        alpha = 1.0 + _uniform(contrast, self.transform.contrast_limit)
        return {"alpha": tf.cast(alpha, tf.float32), "beta": tf.cast(_uniform(brightness, self.transform.brightness_limit), tf.float32)}

    def apply(self, image: tf.Tensor, mask: tf.Tensor, params: Params) -> tuple[tf.Tensor, tf.Tensor]:
        beta = params["beta"] if self.transform.brightness_by_max else params["beta"] * tf.reduce_mean(image)
        return tf.clip_by_value(image * params["alpha"] + beta, 0.0, 1.0), mask


class TFPolicy:
    """A Compose of TF transforms: each gets its own stream split from the example's seed.
    Compiled with XLA: TensorFlow's CPU kernels make one pass over the image per op (the
    bilinear warp alone is some 30), where XLA fuses them into a few loops, about 3x faster
    here (benchmarks/README.md)."""

    def __init__(self, transforms: list[TFTransform]) -> None:
        self.transforms = transforms
        self.compiled = tf.function(self.apply, jit_compile=True)

    def apply(self, image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        for transform, own in zip(self.transforms, _seeds(seed, len(self.transforms))):
            image, mask = transform(image, mask, own)
        return image, mask

    def __call__(self, image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return self.compiled(image, mask, seed)


def build_tf_policy(policy: A.Compose | None, shape: Shape) -> TFPolicy | None:
    """The built albumentations policy as TF ops, or None when an entry (a group, a
    transform or a parameter value) has no TF version: then the caller keeps albumentations."""
    if policy is None or policy.p < 1.0:
        return None
    transforms = []
    for transform in policy.transforms:
        name = type(transform).__name__
        if name not in TF_TRANSFORMS:
            log(f"augmentation: {name} has no TensorFlow version; the policy runs in albumentations (numpy_function)")
            return None
        try:
            transforms.append(TF_TRANSFORMS.get(name)(transform, shape))
        except Unsupported as reason:
            log(f"augmentation: {reason}; the policy runs in albumentations (numpy_function)")
            return None
    return TFPolicy(transforms)


def example_seed_tensor(seed: int, epoch: tf.Tensor, filename: tf.Tensor) -> tf.Tensor:
    """The stateless seed of one example in one epoch, in the graph: a fingerprint of
    "seed:epoch:file name", the key segflow.data.augment.example_seed hashes too."""
    key = tf.strings.join([str(seed), tf.strings.as_string(epoch), filename], separator=":")
    return tf.stack([tf.strings.to_hash_bucket_fast(key, 2**62), tf.constant(seed, tf.int64)])
