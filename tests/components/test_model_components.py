"""Transform, Trainer and Evaluator on the session's tiny trained model (the Exporter's
round trips and the Pusher are in tests/export/test_exporters.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from segflow.components.evaluator import core as evaluator
from segflow.components.exporter import core as exporter
from segflow.components.trainer.core import BACKUP_FOLDER
from segflow.evaluate.analyze import HISTORY_FILE
from segflow.components.transform.core import NORMALIZATION_FILE, transform_layer
from segflow.data.preprocessing import RAW_FEATURE, TRANSFORMED_FEATURE
from segflow.config.experiment import ExperimentConfig
from segflow.data.examples import iter_split
from segflow.utils.io import read_json
from segflow.data.preprocessing import PixelSpec
from segflow.export.serving import SERVING_SUBDIR, ServingSpec, predict_image, saved_model_predictor
from segflow.evaluate.evaluation import is_blessed


def test_transform_standardises_train_pixels(trained: dict) -> None:
    layer = transform_layer(trained["transform"])
    config: ExperimentConfig = trained["config"]
    assert PixelSpec.load(trained["transform"]) == PixelSpec("uint8", 255.0)
    pixels = np.stack([e.image.astype(np.float32) / 255.0 for e in iter_split(trained["examples"], "train")])
    normalized = layer({RAW_FEATURE: tf.constant(pixels)})[TRANSFORMED_FEATURE].numpy()
    np.testing.assert_allclose(normalized.mean(axis=(0, 1, 2)), 0.0, atol=1e-3)
    np.testing.assert_allclose(normalized.std(axis=(0, 1, 2)), 1.0, atol=1e-2)
    assert read_json(Path(trained["transform"]) / NORMALIZATION_FILE)["normalization"] == config.normalization.method


def test_trainer_writes_model_history_logs_and_checkpoint(trained: dict) -> None:
    history = (Path(trained["model_run"]) / HISTORY_FILE).read_text().splitlines()
    assert history[0].split(",")[:2] == ["epoch", "loss"] and len(history) == 2
    assert any((Path(trained["model_run"]) / "logs").rglob("events.out.tfevents.*"))
    # The augmentation preview of this run's train examples, and its policy, are in the run artifact.
    from PIL import Image

    preview = Path(trained["model_run"]) / "augmentation" / "preview.png"
    assert Image.open(preview).size[0] > 2 * trained["config"].shape[1]
    assert "HorizontalFlip" in preview.with_suffix(".policy.json").read_text()
    assert (Path(trained["model_run"]) / "checkpoints" / "last.weights.h5").exists()
    assert (Path(trained["model"]) / SERVING_SUBDIR / "saved_model.pb").exists()
    assert not (Path(trained["model_run"]).parent / BACKUP_FOLDER).exists()  # removed once the run is complete


def test_serving_signature_takes_raw_uint8_of_any_size(trained: dict) -> None:
    loaded = tf.saved_model.load(str(Path(trained["model"]) / SERVING_SUBDIR))
    image = np.random.default_rng(0).integers(0, 255, (1, 45, 61, 3)).astype(np.uint8)
    out = loaded.signatures["serving_default"](images=tf.constant(image))
    assert out["mask"].shape == (1, 45, 61) and out["mask"].dtype == tf.uint8
    np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=-1), 1.0, atol=1e-4)
    # The Python helper used for converted exports computes the same mask as the graph.
    spec = ServingSpec.load(Path(trained["model"]) / SERVING_SUBDIR)
    mask = predict_image(saved_model_predictor(Path(trained["model"]) / SERVING_SUBDIR), image[0], spec)
    assert (mask == out["mask"].numpy()[0]).mean() > 0.999


def test_evaluator_metrics_and_blessing(trained: dict, tmp_path: Path) -> None:
    config: ExperimentConfig = trained["config"]
    report = evaluator.run(config, trained["examples"], trained["model"], tmp_path / "metrics", tmp_path / "blessing")
    assert 0.0 <= report["mean_iou"] <= 1.0 and set(report["per_class_iou"]) == set(config.class_names)
    assert is_blessed(tmp_path / "blessing")  # threshold 0.0
    strict = config.model_copy(update={"evaluation": config.evaluation.model_copy(update={"min_mean_iou": 1.0})})
    evaluator.run(strict, trained["examples"], trained["model"], tmp_path / "metrics2", tmp_path / "blessing2")
    assert (tmp_path / "blessing2" / "NOT_BLESSED").exists()


def test_sigmoid_head_on_16bit_grayscale_with_minmax(tmp_path: Path) -> None:
    """`classes: 1` (sigmoid head), 16-bit single-channel TIFFs, min/max normalisation: the
    paths the multi-class RGB fixture does not take, through every model-side core."""
    import tifffile

    from segflow.config.experiment import validate_config
    from segflow.utils.io import encode_png
    from tests.conftest import train_cores

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for index in range(12):
        mask = np.zeros((32, 32), np.uint8)
        mask[rng.integers(0, 16) :][:, rng.integers(0, 16) :][:12, :12] = 255
        image = (rng.integers(1000, 20000, (32, 32)) + (mask > 0) * 30000).astype(np.uint16)
        tifffile.imwrite(tmp_path / "images" / f"{index}.tif", image)
        (tmp_path / "masks" / f"{index}.png").write_bytes(encode_png(mask))
    config = validate_config(
        {
            "name": "binary",
            "dataset": {"images": str(tmp_path / "images"), "masks": str(tmp_path / "masks"), "eval_split": 0.3},
            "classes": ["cell"],
            "mask_values": [0, 255],
            "shape": [32, 32, 1],
            "normalization": "minmax",
            "model": {"depth": 1, "base_filters": 4},
            "loss": "bce+dice",
            "batch": 4,
            "stages": [{"epochs": 2, "learning_rate": 0.01}],
            "export": ["tflite_int8"],
            "beam": {"running_mode": "in_memory"},
        }
    )
    assert config.sigmoid_head
    train_cores(config, tmp_path)
    normalization = read_json(tmp_path / "transform" / NORMALIZATION_FILE)
    # min/max of 16-bit pixels scaled to [0, 1]: offset -min/spread, scale 1/spread
    assert normalization["offset"][0] < 0 and normalization["scale"][0] > 1
    report = evaluator.run(config, tmp_path / "examples", tmp_path / "model", tmp_path / "metrics", tmp_path / "blessing")
    assert ServingSpec.load(tmp_path / "model" / SERVING_SUBDIR).input_dtype == "uint16"
    assert set(report["per_class_iou"]) == {"background", "cell"}
    exports = exporter.run(config, tmp_path / "examples", tmp_path / "model", tmp_path / "exports")
    assert 0.0 <= exports["tflite_int8"]["mean_iou"] <= 1.0


def test_cache_budget_estimate() -> None:
    from segflow.train.input_pipeline import CACHE_BUDGET_BYTES, cache_bytes

    assert cache_bytes(10, [32, 32, 3]) == 10 * 32 * 32 * 13
    assert cache_bytes(367, [192, 256, 3]) < CACHE_BUDGET_BYTES < cache_bytes(2975, [512, 1024, 3])
