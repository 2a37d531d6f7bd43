"""The trainer under faults and speed switches: out of memory halves the batch and retries the
stage from its backup; a diverging loss stops with an error naming stage and epoch and keeps
the last good weights; mixed precision and XLA train and still serve float32.

The data components run once per module; each test runs the real trainer core on them.
Faults are injected where TensorFlow would raise them: inside fit, from a callback.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from segflow.components.trainer import core as trainer
from segflow.components.trainer.core import BACKUP_FOLDER, TRAINING_FILE
from segflow.train import stages
from segflow.train.network import build_network
from segflow.train.robustness import LAST_GOOD_FILE, BatchTooLarge, TrainingDiverged
from segflow.evaluate.analyze import HISTORY_FILE
from segflow.config.experiment import ExperimentConfig, validate_config
from segflow.utils.io import read_json
from tests.conftest import tiny_raw_config


@pytest.fixture(scope="module")
def data(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ExampleGen -> StatisticsGen -> SchemaGen -> Transform outputs for the tiny dataset."""
    from segflow.components.example_gen import core as example_gen
    from segflow.components.schema_gen import core as schema_gen
    from segflow.components.statistics_gen import core as statistics_gen
    from segflow.components.transform import core as transform

    root, config = tmp_path_factory.mktemp("robustness"), validate_config(tiny_raw_config(tiny_data))
    example_gen.run(config, root / "examples")
    statistics_gen.run(config, root / "examples", root / "statistics")
    schema_gen.run(config, root / "statistics", root / "schema")
    transform.run(config, root / "examples", root / "schema", root / "transform")
    return root


def _train(config: ExperimentConfig, data: Path, out: Path) -> dict[str, Any]:
    return trainer.run(config, data / "examples", data / "transform", out / "model", out / "model_run")


def _history(out: Path) -> list[dict[str, str]]:
    with open(out / "model_run" / HISTORY_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


class _OutOfMemory(keras.callbacks.Callback):
    """Raises ResourceExhaustedError at the first batch of epochs >= `from_epoch` while an epoch
    has fewer than `max_steps` steps, i.e. while the batch is too large for this 'device'."""

    def __init__(self, from_epoch: int, max_steps: int) -> None:
        super().__init__()
        self.from_epoch, self.max_steps, self.epoch = from_epoch, max_steps, 0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self.epoch >= self.from_epoch and self.params["steps"] < self.max_steps:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[4,32,32,4] (injected)")


def _inject(monkeypatch: pytest.MonkeyPatch, make: Callable[[], keras.callbacks.Callback]) -> None:
    """A fresh fault callback in every fit attempt, where the trainer adds its fault callbacks."""
    monkeypatch.setattr(stages, "fault_callbacks", lambda plan: [make()])


def test_out_of_memory_halves_the_batch_and_retries_the_stage_from_its_backup(
    make_config: Any, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(batch=4, stages=[{"epochs": 3, "learning_rate": 0.003}])
    train_examples = read_json(data / "examples" / "counts.json")["train_examples"]
    steps = {batch: -(-train_examples // batch) for batch in (4, 2)}
    _inject(monkeypatch, lambda: _OutOfMemory(from_epoch=1, max_steps=steps[2]))  # batch 4 fits in epoch 1 only
    _train(config, data, tmp_path)
    assert read_json(tmp_path / "model_run" / TRAINING_FILE) == {
        "batch": 2, "configured_batch": 4, "batch_halvings": 1, "epochs_before_resume": 0, "mixed_precision": None, "jit_compile": False,
    }
    rows = _history(tmp_path)
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]  # epoch 1 from the backup, not trained twice
    # Epoch 1 at batch 4; the retry counts the restored epoch in batch-2 steps, as its schedule does.
    assert [int(float(row["optimizer_steps"])) for row in rows] == [steps[4], 2 * steps[2], 3 * steps[2]]


def test_out_of_memory_at_batch_one_fails_clearly_and_keeps_the_backup(
    make_config: Any, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(batch=4, stages=[{"epochs": 2, "learning_rate": 0.003}])
    _inject(monkeypatch, lambda: _OutOfMemory(from_epoch=1, max_steps=10**6))
    with pytest.raises(BatchTooLarge, match="stage 1 runs out of memory even at batch 1"):
        _train(config, data, tmp_path)
    assert any((tmp_path / BACKUP_FOLDER / "stage-1").iterdir())  # epoch 1, to resume from
    assert not (tmp_path / "model").exists()


def test_a_diverging_stage_stops_with_its_stage_and_epoch_and_keeps_the_last_good_weights(make_config: Any, data: Path, tmp_path: Path) -> None:
    config = make_config(stages=[{"epochs": 1, "learning_rate": 0.003}, {"epochs": 2, "learning_rate": 1e30}])
    with pytest.raises(TrainingDiverged, match=r"stage 2, epoch 2 \(batch \d+\): loss (nan|inf)"):
        _train(config, data, tmp_path)
    backup = tmp_path / BACKUP_FOLDER
    stage_one, last_good = build_network(config), build_network(config)
    stage_one.load_weights(str(backup / "stage-1.weights.h5"))
    last_good.load_weights(str(backup / LAST_GOOD_FILE))
    for kept, expected in zip(last_good.get_weights(), stage_one.get_weights()):
        np.testing.assert_array_equal(kept, expected)  # stage 2 diverged in its first epoch: stage 1's weights
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    "switches", [{"mixed_precision": "mixed_float16"}, {"mixed_precision": "mixed_bfloat16"}, {"jit_compile": True}], ids=["float16", "bfloat16", "xla"]
)
def test_speed_switches_train_and_serve_float32(
    switches: dict[str, Any], make_config: Any, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ai_edge_litert.interpreter import Interpreter

    from segflow.export.exporters import EXPORT_FORMATS
    from segflow.export.serving import SERVING_SUBDIR

    config = make_config(trainer=switches)
    networks: list[keras.Model] = []
    build = trainer.build_trained_network
    monkeypatch.setattr(trainer, "build_trained_network", lambda *args: networks.append(build(*args)) or networks[-1])
    final = _train(config, data, tmp_path)
    assert np.isfinite(final["loss"])
    trained = networks[0]  # what fit ran: the policy's compute dtype inside, float32 logits out
    assert trained.dtype_policy.name == switches.get("mixed_precision", "float32") and trained.outputs[0].dtype == tf.float32
    assert trained._jit_compile is switches.get("jit_compile", False)
    assert keras.mixed_precision.global_policy().name == "float32"  # the policy does not leak out of the trainer
    served = tf.saved_model.load(str(tmp_path / "model" / SERVING_SUBDIR))
    height, width, channels = config.shape
    probabilities = served.signatures["fixed_size"](pixels=tf.zeros([1, height, width, channels]))["probabilities"]
    assert probabilities.dtype == tf.float32 and np.allclose(probabilities.numpy().sum(-1), 1.0, atol=1e-4)
    tflite = tmp_path / "model.tflite"
    EXPORT_FORMATS.get("tflite_fp32").build(tmp_path / "model" / SERVING_SUBDIR, tflite, None)
    interpreter = Interpreter(model_path=str(tflite))
    assert [detail["dtype"] for detail in interpreter.get_output_details()] == [np.float32]
