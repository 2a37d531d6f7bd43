"""One preprocessing path from training to serving.

For an 8-bit RGB, an 8-bit grayscale and a 16-bit dataset whose values use only the low
8 bits, a model is trained through the real cores; then `serving_default` on raw pixels
(what the Evaluator scores), the `fixed_size` path, and the TFLite exports must agree.
Before this path existed, `serving_default` took only uint8 and scaled by 1/255 while
training scaled 16-bit images by 1/65535, and the TFT spread of narrow-range data hit
its floor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from segflow.components.exporter import core as exporter
from segflow.components.transform.core import transform_layer
from segflow.data.preprocessing import RAW_FEATURE, TRANSFORMED_FEATURE
from segflow.config.experiment import validate_config
from segflow.evaluate.evaluation import predict_split
from segflow.data.examples import iter_split
from segflow.utils.io import encode_png
from segflow.data.preprocessing import PixelSpec, model_pixels_numpy, scale_pixels, to_model_channels
from segflow.export.serving import SERVING_SUBDIR, ServingSpec, predict_image, saved_model_predictor, serving_mask_predictor
from tests.conftest import train_cores

KINDS = ("rgb8", "gray8", "gray16_low8")


def write_disk_dataset(root: Path, kind: str, count: int = 24, size: int = 40) -> Path:
    """Bright disks on a darker noisy background: easy enough that a tiny model is
    confident, so agreement measures the preprocessing path and not a coin toss."""
    rng = np.random.default_rng(7)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    for index in range(count):
        cy, cx = rng.integers(10, size - 10, 2)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(36, 81)
        grey = np.where(disk, rng.normal(190, 15, disk.shape), rng.normal(70, 20, disk.shape))
        grey = np.clip(grey, 0, 255)
        if kind == "rgb8":
            tint = np.array([1.0, 0.8, 0.6]) if index % 2 else np.array([0.6, 0.9, 1.0])
            image = np.clip(grey[..., None] * tint, 0, 255).astype(np.uint8)
        elif kind == "gray8":
            image = grey.astype(np.uint8)[..., None]
        else:
            image = grey.astype(np.uint16)[..., None]  # 8-bit values in a 16-bit container
        (root / "images" / f"{index:03d}.png").write_bytes(encode_png(image))
        (root / "masks" / f"{index:03d}.png").write_bytes(encode_png(disk.astype(np.uint8)))
    return root


@pytest.fixture(scope="module", params=KINDS)
def parity_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    data = write_disk_dataset(root / "data", kind)
    config = validate_config(
        {
            "name": f"parity-{kind}",
            "dataset": {"images": str(data / "images"), "masks": str(data / "masks"), "eval_split": 0.25},
            "classes": ["background", "disk"],
            "shape": [32, 32, 3 if kind == "rgb8" else 1],
            "model": {"depth": 2, "base_filters": 8},
            "loss": "crossentropy+0.5*dice",
            "batch": 4,
            "stages": [{"epochs": 12, "learning_rate": 0.01}],
            "export": ["saved_model", "tflite_fp32", "tflite_int8"],
            "beam": {"running_mode": "in_memory"},
            "deterministic": True,
        }
    )
    run = train_cores(config, root / "run")
    run["kind"] = kind
    run["exports"] = exporter.run(config, run["examples"], run["model"], root / "run" / "exports")
    return run


def test_pixel_spec_follows_the_data(parity_run: dict[str, Any]) -> None:
    spec = ServingSpec.load(Path(parity_run["model"]) / SERVING_SUBDIR)
    expected = {"rgb8": ("uint8", 255.0), "gray8": ("uint8", 255.0), "gray16_low8": ("uint16", 255.0)}[parity_run["kind"]]
    assert (spec.input_dtype, spec.value_max) == expected


def test_narrow_range_data_is_normalised_by_its_real_spread(parity_run: dict[str, Any]) -> None:
    """TFT standardisation gives unit variance on the train split for every kind; before,
    8-bit values in 16-bit files were divided by a floor and reached hundreds."""
    pixels = PixelSpec.load(parity_run["transform"])
    shape = parity_run["config"].shape
    batch = np.concatenate([model_pixels_numpy(example.image, shape) for example in iter_split(parity_run["examples"], "train")])
    normalized = transform_layer(parity_run["transform"])({RAW_FEATURE: scale_pixels(tf.constant(batch), pixels.value_max)})[TRANSFORMED_FEATURE]
    assert abs(float(tf.math.reduce_std(normalized)) - 1.0) < 0.05
    assert float(tf.reduce_max(tf.abs(normalized))) < 10.0


def test_serving_default_agrees_with_fixed_size_on_raw_pixels(parity_run: dict[str, Any]) -> None:
    """The signature users call, fed the file's raw dtype, equals the evaluated model-size path."""
    serving = Path(parity_run["model"]) / SERVING_SUBDIR
    spec = ServingSpec.load(serving)
    served = serving_mask_predictor(serving)
    fixed = saved_model_predictor(serving)
    agreeing = total = 0
    for example in iter_split(parity_run["examples"], "eval"):
        assert example.image.dtype.name == spec.input_dtype
        agreeing += int((served(example.image) == predict_image(fixed, example.image, spec)).sum())
        total += example.mask.size
    assert agreeing / total >= 0.999


@pytest.mark.parametrize(("export", "minimum"), [("saved_model", 0.999), ("tflite_fp32", 0.999), ("tflite_int8", 0.99)])
def test_exports_agree_with_serving_default(parity_run: dict[str, Any], export: str, minimum: float) -> None:
    entry = parity_run["exports"][export]
    assert entry["agreement_with_serving"] >= minimum, entry
    # and the model learnt the task, so agreement is not between two constant predictions
    assert entry["mean_iou"] > 0.6, entry


def test_the_evaluator_scores_serving_default(parity_run: dict[str, Any], tmp_path: Path) -> None:
    from segflow.components.evaluator import core as evaluator

    report = evaluator.run(parity_run["config"], parity_run["examples"], parity_run["model"], tmp_path / "m", tmp_path / "b")
    served = predict_split(serving_mask_predictor(Path(parity_run["model"]) / SERVING_SUBDIR), parity_run["examples"], "eval")
    from segflow.model.metrics import ConfusionMatrix

    matrix = ConfusionMatrix(2)
    for example in iter_split(parity_run["examples"], "eval"):
        matrix.update(example.mask, served[example.filename])
    assert report["mean_iou"] == pytest.approx(matrix.report()["mean_iou"])


@pytest.mark.parametrize(("source", "channels"), [(1, 3), (3, 1), (4, 3), (4, 1), (3, 3), (1, 1)])
def test_channel_conversion(source: int, channels: int) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (2, 5, 6, source)).astype(np.float32)
    converted = to_model_channels(tf.constant(image), channels).numpy()
    assert converted.shape == (2, 5, 6, channels)
    if source >= 3 and channels == 1:
        np.testing.assert_allclose(converted[..., 0], image[..., :3] @ np.array([0.299, 0.587, 0.114]), rtol=1e-5)
    elif source == 1:
        np.testing.assert_array_equal(converted, np.repeat(image, channels, axis=-1))
    else:
        np.testing.assert_array_equal(converted, image[..., :channels])


def test_serving_accepts_uint8_and_uint16_of_any_size(trained: dict) -> None:
    loaded = tf.saved_model.load(str(Path(trained["model"]) / SERVING_SUBDIR))
    image = np.random.default_rng(0).integers(0, 255, (1, 45, 61, 3))
    eight = loaded.signatures["serving_uint8"](images=tf.constant(image.astype(np.uint8)))["mask"].numpy()
    sixteen = loaded.signatures["serving_uint16"](images=tf.constant(image.astype(np.uint16)))["mask"].numpy()
    grey = loaded.signatures["serving_default"](images=tf.constant(image[..., :1].astype(np.uint8)))["mask"].numpy()
    assert eight.shape == sixteen.shape == grey.shape == (1, 45, 61)
    np.testing.assert_array_equal(eight, sixteen)  # raw counts mean the same in either dtype
