"""The TensorFlow versions of augmentation transforms (segflow/data/tf_augment.py) against
albumentations, and the trainer's stream on the TF path.

Every entry of TF_TRANSFORMS is exercised through CASES (a new entry without a case fails
`test_every_tf_transform_has_cases`): built from its YAML entry by segflow's build_policy, its
parameters drawn once by the TF version, then the same image and parameters go through the
TF `apply` (XLA-compiled, as the trainer runs it) and albumentations' own `apply`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import albumentations as A
import cv2
import numpy as np
import pytest
import tensorflow as tf
from albumentations.augmentations.geometric import functional as fgeometric

from segflow.data.augment import build_policy
from segflow.data.tf_augment import TF_TRANSFORMS, TFTransform, affine_matrix, build_tf_policy, example_seed_tensor

IGNORE = 11
CASES: dict[str, list[dict[str, Any]]] = {
    "HorizontalFlip": [{}],
    "VerticalFlip": [{}],
    "Affine": [
        {"rotate": [-30, 30], "scale": [0.8, 1.2], "translate_percent": [-0.1, 0.1], "shear": [-10, 10]},  # segflow's mirrored border
        {"rotate": [-30, 30], "scale": [0.7, 0.9], "border_mode": cv2.BORDER_CONSTANT},  # new mask pixels: ignore_index
        {"translate_px": [-6, 6], "rotate": [-20, 20], "scale": [0.9, 1.2], "keep_ratio": True, "border_mode": cv2.BORDER_REFLECT},
        {"rotate": [-30, 30], "border_mode": cv2.BORDER_WRAP, "interpolation": cv2.INTER_NEAREST},
        {"rotate": [-30, 30], "scale": [0.7, 0.8], "border_mode": cv2.BORDER_REPLICATE},
        {"ZoomOut": {"scale": [0.6, 0.8]}},  # segflow's alias: an Affine with a constant border
    ],
    "ColorJitter": [{"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.1}, {"Saturation": {}}],
    "RandomBrightnessContrast": [{}, {"brightness_by_max": False, "contrast_limit": 0.4}, {"Contrast": {}}],
}
Reference = Callable[[A.BasicTransform, np.ndarray, np.ndarray, dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]


def _affine(transform: A.Affine, image: np.ndarray, mask: np.ndarray, params: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    shape = image.shape[:2]
    return transform.apply(image, matrix=params["matrix"], output_shape=shape), transform.apply_to_mask(mask, matrix=params["matrix"], output_shape=shape)


def _jitter(transform: A.ColorJitter, image: np.ndarray, mask: np.ndarray, params: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    brightness, contrast, saturation, hue = (float(value) for value in params["factors"])
    out = transform.apply(image.copy(), brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, order=[int(i) for i in params["order"]])
    return out, mask


def _brightness_contrast(transform: A.RandomBrightnessContrast, image: np.ndarray, mask: np.ndarray, params: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    beta = float(params["beta"]) * (1.0 if transform.brightness_by_max else float(np.mean(image)))  # as its get_params scales it
    return transform.apply(image, alpha=float(params["alpha"]), beta=beta), mask


# albumentations' result for the parameters the TF version drew.
REFERENCE: dict[str, Reference] = {
    "HorizontalFlip": lambda t, image, mask, params: (t.apply(image), t.apply_to_mask(mask)),
    "VerticalFlip": lambda t, image, mask, params: (t.apply(image), t.apply_to_mask(mask)),
    "Affine": _affine,
    "ColorJitter": _jitter,
    "RandomBrightnessContrast": _brightness_contrast,
}
GEOMETRIC = frozenset({"HorizontalFlip", "VerticalFlip", "Affine"})


def _scene(channels: int, height: int = 40, width: int = 56) -> tuple[np.ndarray, np.ndarray]:
    """A smooth image in [0, 1] and a mask of blocky regions (labels 0..10 and ignore_index)."""
    rng = np.random.default_rng(channels)
    image = cv2.resize(rng.random((5, 7, channels), np.float32), (width, height), interpolation=cv2.INTER_CUBIC).clip(0.0, 1.0)
    mask = cv2.resize(rng.integers(0, IGNORE + 1, (5, 7)).astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    return image.reshape(height, width, channels), mask


def _entry(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The YAML entry of a case: the class with its parameters, or an alias given as {alias: params}."""
    if len(params) == 1 and isinstance(next(iter(params.values())), dict):
        ((alias, alias_params),) = params.items()
        return {alias: {**alias_params, "p": 1.0}}
    return {name: {**params, "p": 1.0}}


def test_every_tf_transform_has_cases() -> None:
    assert set(CASES) == set(TF_TRANSFORMS.names()) == set(REFERENCE)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name,index", [(name, index) for name, cases in CASES.items() for index in range(len(cases))])
def test_tf_transform_matches_albumentations(name: str, index: int, channels: int) -> None:
    image, mask = _scene(channels)
    (transform,) = build_policy(_entry(name, CASES[name][index]), ignore_index=IGNORE).transforms
    assert type(transform).__name__ == name
    tf_transform: TFTransform = TF_TRANSFORMS.get(name)(transform, image.shape)
    sample = tf.function(tf_transform.sample, jit_compile=True)
    apply = tf.function(tf_transform.apply, jit_compile=True)
    allowed = set(np.unique(mask).tolist()) | {IGNORE}
    for seed in range(4):
        params = sample(tf.constant([seed, 1], tf.int64))
        out_image, out_mask = (value.numpy() for value in apply(tf.constant(image), tf.constant(mask), params))
        ref_image, ref_mask = REFERENCE[name](transform, image, mask, {key: value.numpy() for key, value in params.items()})
        ref_image = ref_image.reshape(image.shape)
        assert out_image.shape == image.shape and out_image.dtype == np.float32
        assert out_mask.shape == mask.shape and out_mask.dtype == np.uint8
        assert set(np.unique(out_mask).tolist()) <= allowed
        assert out_image.min() >= 0.0 and out_image.max() <= 1.0
        if name in ("HorizontalFlip", "VerticalFlip"):
            np.testing.assert_array_equal(out_image, ref_image)
            np.testing.assert_array_equal(out_mask, ref_mask)
        elif name == "Affine":
            # OpenCV rounds source coordinates in fixed point (1/1024, then the 1/32 grid): a
            # grid step at most inside the image, a little more on the one-pixel ring whose
            # neighbours come from the border.
            difference = np.abs(out_image - ref_image).max(axis=-1)
            interior = _reads_inside(params["matrix"].numpy(), image.shape)
            assert difference[interior].max() <= 0.005 and difference.max() <= 0.05, (seed, difference[interior].max(), difference.max())
            _assert_mask_differs_only_at_edges(out_mask, ref_mask)
        else:
            np.testing.assert_allclose(out_image, ref_image, atol=1e-4)
            np.testing.assert_array_equal(out_mask, mask)


def _reads_inside(matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Output pixels whose bilinear neighbours all lie inside the input image."""
    height, width = shape[:2]
    rows, cols = np.mgrid[0:height, 0:width]
    source = np.linalg.inv(matrix) @ np.stack([cols.ravel(), rows.ravel(), np.ones(rows.size)])
    x, y = (source[axis].reshape(height, width) for axis in (0, 1))
    return (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)


def _assert_mask_differs_only_at_edges(out: np.ndarray, ref: np.ndarray) -> None:
    """Nearest sampling may round a half-way source coordinate the other way: the value then
    comes from an adjacent pixel, so it must appear in the reference's 3x3 neighbourhood."""
    rows, cols = np.nonzero(out != ref)
    assert rows.size <= 0.01 * out.size, rows.size
    padded = np.pad(ref, 1, mode="edge")
    for row, col in zip(rows, cols):
        assert out[row, col] in padded[row : row + 3, col : col + 3]


def test_affine_matrix_is_albumentations() -> None:
    shape = (40, 56, 3)
    for translate, shear, scale, rotate in [((3.0, -2.0), (5.0, -7.0), (0.9, 1.2), 33.0), ((0.0, 0.0), (0.0, 0.0), (1.0, 1.0), -400.0)]:
        ours = affine_matrix(*(tuple(tf.constant(v, tf.float64) for v in pair) for pair in (translate, shear, scale)), tf.constant(rotate, tf.float64), shape)
        theirs = fgeometric.create_affine_transformation_matrix(dict(zip("xy", translate)), dict(zip("xy", shear)), dict(zip("xy", scale)), rotate, fgeometric.center(shape[:2]))
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-9)


def test_affine_draws_stay_in_their_ranges() -> None:
    (transform,) = build_policy({"Affine": {"translate_px": [-3, 3], "rotate": [-10, 10], "p": 1.0}}).transforms
    tf_transform = TF_TRANSFORMS.get("Affine")(transform, (40, 56, 3))
    for seed in range(20):
        matrix = tf_transform.sample(tf.constant([seed, 0], tf.int64))["matrix"].numpy()
        centre = np.array([56 / 2 - 0.5, 40 / 2 - 0.5, 1.0])
        shift = matrix @ centre - centre  # rotation about the centre leaves only the translation
        assert np.all(np.abs(shift[:2]) <= 3 + 1e-9) and np.allclose(shift[:2], np.round(shift[:2]))
        angle = np.degrees(np.arctan2(matrix[0, 1], matrix[0, 0]))
        assert -10 <= angle <= 10


def test_probability_gates_each_example() -> None:
    policy = build_tf_policy(build_policy({"HorizontalFlip": {"p": 0.5}}), (8, 8, 1))
    assert policy is not None
    image = tf.constant(np.arange(64, dtype=np.float32).reshape(8, 8, 1) / 64)
    mask = tf.zeros((8, 8), tf.uint8)
    flipped = [not np.array_equal(policy(image, mask, tf.constant([seed, 0], tf.int64))[0].numpy(), image.numpy()) for seed in range(200)]
    assert 0.35 <= np.mean(flipped) <= 0.65
    again = [not np.array_equal(policy(image, mask, tf.constant([seed, 0], tf.int64))[0].numpy(), image.numpy()) for seed in range(200)]
    assert flipped == again


@pytest.mark.parametrize(
    "spec",
    [
        {"GaussNoise": {}},  # no TF version
        {"OneOf": {"transforms": {"HorizontalFlip": {}, "VerticalFlip": {}}}},  # groups stay on albumentations
        {"Affine": {"fit_output": True}},  # a parameter value without a TF version
        {"Affine": {"interpolation": cv2.INTER_CUBIC}},
        {"RandomBrightnessContrast": {"ensure_safe_range": True}},
    ],
)
def test_policies_without_tf_versions_stay_on_albumentations(spec: dict[str, Any]) -> None:
    assert build_tf_policy(build_policy(spec), (16, 16, 3)) is None


def test_example_seed_depends_on_seed_epoch_and_file() -> None:
    seeds = {tuple(example_seed_tensor(seed, tf.constant(epoch, tf.int64), tf.constant(name)).numpy()) for seed in (0, 1) for epoch in (0, 1) for name in ("a.png", "b.png")}
    assert len(seeds) == 8
    assert tuple(example_seed_tensor(0, tf.constant(1, tf.int64), tf.constant("a.png")).numpy()) == tuple(
        example_seed_tensor(0, tf.constant(1, tf.int64), tf.constant("a.png")).numpy()
    )


def test_trainer_stream_on_the_tf_path_is_deterministic(make_config: Any, tmp_path: Path) -> None:
    from segflow.components.example_gen import core as example_gen
    from segflow.train import input_pipeline as trainer
    from segflow.data.preprocessing import RAW_FEATURE, TRANSFORMED_FEATURE
    from segflow.data.preprocessing import PixelSpec

    augmentation = {
        "HorizontalFlip": {"p": 0.5},
        "Affine": {"scale": [0.9, 1.1], "rotate": [-15, 15], "translate_percent": [-0.05, 0.05], "p": 1.0},
        "ColorJitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05, "p": 1.0},
    }
    config = make_config(augmentation=augmentation, ignore_index=IGNORE)
    assert build_tf_policy(build_policy(config.augmentation, ignore_index=IGNORE), tuple(config.shape)) is not None
    example_gen.run(config, tmp_path / "examples")

    def identity(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {TRANSFORMED_FEATURE: features[RAW_FEATURE]}

    def stream(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        seeded = make_config(augmentation=augmentation, ignore_index=IGNORE, seed=seed)
        dataset = trainer.make_dataset(seeded, tmp_path / "examples", "train", identity, PixelSpec("uint8", 255.0), epochs=(0, 2))
        return [(image.numpy(), mask.numpy()) for image, mask in dataset]

    first, second, other = stream(0), stream(0), stream(1)
    assert len(first) == len(second) > 1
    for (image_a, mask_a), (image_b, mask_b) in zip(first, second):
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(mask_a, mask_b)
        assert set(np.unique(mask_a).tolist()) <= set(range(len(config.class_names) + 1)) | {IGNORE}
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))
