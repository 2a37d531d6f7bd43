"""Every registered optimizer, Lookahead, SWA and the stage callbacks (early stopping, the N
best checkpoints, live predictions, per-stage overrides) on tiny problems."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from segflow.config.experiment import LookaheadConfig, OptimizerConfig, validate_config

from segflow.utils.errors import ConfigError
from segflow.train.optimizers import RAdam, Lookahead, WeightAveraging, build_optimizer, recompute_batchnorm
from segflow.utils.registry import OPTIMIZERS

from tests.conftest import tiny_raw_config, train_cores

STEPS = 30


def _problem() -> tuple[np.ndarray, np.ndarray]:
    """A linearly separable two-class problem: 64 points, 4 features."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(64, 4)).astype(np.float32)
    return features, (features @ np.array([1.0, -2.0, 0.5, 1.5], np.float32) > 0).astype(np.int32)


def _settings(name: str) -> list[OptimizerConfig]:
    """The optimizer plainly, with clipnorm, with the parameters it accepts, and inside Lookahead."""
    accepted = OPTIMIZERS.get(name).parameters
    extra: dict[str, Any] = {"momentum": 0.9} if "momentum" in accepted else {}
    if "nesterov" in accepted:
        extra["nesterov"] = True
    return [
        OptimizerConfig(name=name),
        OptimizerConfig(name=name, clipnorm=1.0, **extra),
        OptimizerConfig(name=name, lookahead=LookaheadConfig(sync_period=5)),
    ]


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_reduces_the_loss(name: str) -> None:
    features, labels = _problem()
    for settings in _settings(name):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile(optimizer=build_optimizer(settings, 0.05), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        before = model.evaluate(features, labels, verbose=0)
        callbacks = [Lookahead(settings.lookahead)] if settings.lookahead else []
        model.fit(features, labels, batch_size=16, epochs=STEPS // 4, callbacks=callbacks, verbose=0)
        after = model.evaluate(features, labels, verbose=0)
        assert after < 0.95 * before, (settings, before, after)


def test_radam_starts_as_momentum_sgd() -> None:
    """While rho_t <= 5 (the first steps) RAdam's step is lr * bias-corrected momentum: lr * g at step 1."""
    variable = tf.Variable([1.0, -2.0])
    optimizer = RAdam(0.1)
    optimizer.apply_gradients([(tf.constant([0.5, 2.0]), variable)])
    np.testing.assert_allclose(variable.numpy(), [1.0 - 0.05, -2.0 - 0.2], rtol=1e-6)


def test_lookahead_moves_slow_weights_half_way() -> None:
    """SGD at rate 0.1 on loss = sum(w) (gradient 1): after 2 fast steps w0 - 0.2; the sync with
    alpha 0.5 sets the weights to w0 - 0.1."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=lambda y, p: tf.reduce_sum(model.trainable_variables[0]) + 0.0 * tf.reduce_sum(p))
    model.fit(np.ones((2, 1), np.float32), np.zeros((2, 1), np.float32), batch_size=1, epochs=1, callbacks=[Lookahead(LookaheadConfig(sync_period=2, slow_step=0.5))], verbose=0)
    np.testing.assert_allclose(model.get_weights()[0], [[0.9]], rtol=1e-6)


def test_weight_averaging_is_the_mean_of_the_last_epochs() -> None:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    snapshots = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: snapshots.append(model.get_weights()))
    x, y = np.random.default_rng(1).normal(size=(8, 2)).astype(np.float32), np.ones((8, 1), np.float32)
    model.fit(x, y, epochs=4, callbacks=[record, WeightAveraging(2, 4)], verbose=0)
    for averaged, *last in zip(model.get_weights(), *snapshots[-2:]):
        np.testing.assert_allclose(averaged, np.mean(last, axis=0), rtol=1e-5)


def test_batchnorm_statistics_are_recomputed_as_the_mean_of_batches() -> None:
    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(), keras.layers.Dense(1)])
    batches = [(tf.constant(np.full((4, 3), value, np.float32) + np.arange(4, dtype=np.float32)[:, None]), tf.zeros(4)) for value in (0.0, 2.0, 10.0)]
    assert recompute_batchnorm(model, batches) == 3
    layer = model.layers[0]
    np.testing.assert_allclose(layer.moving_mean.numpy(), [1.5 + 4.0] * 3, rtol=1e-5)  # batch means 1.5, 3.5, 11.5
    np.testing.assert_allclose(layer.moving_variance.numpy(), [1.25] * 3, rtol=1e-5)  # variance of 0..3 in every batch
    assert layer.momentum == 0.99


def test_optimizer_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="nesterov is not a parameter of optimizer 'adam'"):
        OptimizerConfig(name="adam", nesterov=True)
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        OptimizerConfig(name="lamb")


def test_stage_settings_are_checked(tmp_path: Path) -> None:
    raw = tiny_raw_config(tmp_path, stages=[{"epochs": 2, "optimizer": {"swa_epochs": 3}}])
    with pytest.raises(ConfigError, match="swa_epochs 3 is more than the stage's 2 epochs"):
        validate_config(raw)
    with pytest.raises(ConfigError, match="restore: best needs keep_best"):
        validate_config(tiny_raw_config(tmp_path, callbacks={"restore": "best"}))


def _history(model_run: Path) -> list[dict[str, str]]:
    with open(model_run / "history.csv") as handle:
        return list(csv.DictReader(handle))


def test_stages_override_and_callbacks_act(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    """Stage 1: SGD, keep the 2 best of 3 epochs and end on the best, predictions every epoch.
    Stage 2: initial weights from a file, its own loss, cosine schedule, SWA over its epochs, and
    early stopping that no epoch can satisfy (min_delta 2 on a mean IoU), so it stops after
    1 + patience epochs, not 4."""
    from segflow.train import network, stages

    used: dict[str, list[Any]] = {"losses": [], "optimizers": []}
    build_loss, make_optimizer = network.build_loss, stages.build_optimizer

    def spy_loss(expression: str, labels: Any) -> Callable:
        used["losses"].append(expression)
        return build_loss(expression, labels)

    def spy_optimizer(settings: OptimizerConfig, rate: Any) -> keras.optimizers.Optimizer:
        used["optimizers"].append(settings.name)
        return make_optimizer(settings, rate)

    monkeypatch.setattr(network, "build_loss", spy_loss)
    monkeypatch.setattr(stages, "build_optimizer", spy_optimizer)
    config = validate_config(
        tiny_raw_config(
            tiny_data,
            augmentation={},
            stages=[
                {"epochs": 3, "learning_rate": 0.01, "optimizer": {"name": "sgd", "momentum": 0.9},
                 "callbacks": {"keep_best": 2, "restore": "best", "predictions_every": 1, "prediction_images": 2}},
                {"epochs": 4, "learning_rate": 0.004, "loss": "dice", "schedule": {"name": "cosine"},
                 "initial_weights": str(tmp_path / "backup" / "stage-1.weights.h5"),  # what stage 1 ended with
                 "callbacks": {"early_stopping": {"patience": 1, "min_delta": 2.0}}},
            ],
            optimizer={"name": "adam", "swa_epochs": 4},
        )
    )
    out = train_cores(config, tmp_path)
    model_run = out["model_run"]
    history = _history(model_run)
    assert len(history) == 3 + 2  # stage 2 stopped early
    assert used["optimizers"][:2] == ["sgd", "adam"] and used["losses"][:2] == ["crossentropy+0.5*dice", "dice"]
    rates = [float(row["lr"]) for row in history]
    assert rates[:3] == pytest.approx([0.01] * 3)
    steps = 4  # 15 training examples, batch 4; the logged rate is that of the epoch's last step (step 3 of 16)
    assert rates[3] == pytest.approx(0.002 * (1 + np.cos(np.pi * (steps - 1) / (4 * steps))), rel=1e-5)
    best = sorted((model_run / "checkpoints").glob("stage1-*.weights.h5"))
    assert len(best) == 2
    assert sorted(path.name for path in (model_run / "predictions").glob("*.png")) == ["epoch001.png", "epoch002.png", "epoch003.png"]
    panels = _tensorboard_values(model_run / "logs" / "images")
    assert sorted(step for step, _ in panels["image | truth | prediction"]) == [1, 2, 3]
    (_, text), = _tensorboard_values(model_run / "logs" / "config")["config"]
    assert "predictions_every: 1" in text and "loss: dice" in text
    logged = capfd.readouterr().err
    assert "stage 2: initial weights from" in logged and "weights averaged over 2 epochs (SWA)" in logged


def _tensorboard_values(folder: Path) -> dict[str, list[tuple[int, str]]]:
    """tag -> [(step, text or image count)] of the TensorBoard event files in `folder`."""
    import tensorflow as tf

    found: dict[str, list[tuple[int, str]]] = {}
    for file in folder.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(file)):
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor)
                shown = tensor.item().decode() if tensor.dtype == object and tensor.ndim == 0 else str(len(tensor) - 2)  # images: width, height, then PNGs
                found.setdefault(value.tag, []).append((event.step, shown))
    return found


# 40-70 s: two worker processes; tests/train/test_distribution.py keeps two-worker training in the default suite.
@pytest.mark.slow
def test_two_workers_agree_with_every_stage_feature(tiny_data: Path, tmp_path: Path) -> None:
    """Lookahead(RAdam) with a cyclical schedule and plateau reductions, the best checkpoint
    restored, live predictions, then SWA (BatchNorm pass) from an initial weights file, under
    MultiWorkerMirroredStrategy: the workers end with identical weights."""
    from segflow.train.multiworker import WORKERS_FILE
    from segflow.train.network import build_network

    stages = [
        {"epochs": 2, "learning_rate": 0.01, "optimizer": {"name": "radam", "lookahead": {"sync_period": 3}},
         "schedule": {"name": "cyclical", "cycle_epochs": 1, "min_learning_rate": 0.001, "reduce_on_plateau": {"patience": 1}},
         "callbacks": {"keep_best": 1, "restore": "best", "predictions_every": 1, "prediction_images": 2}},
        {"epochs": 2, "learning_rate": 0.003, "optimizer": {"name": "sgd", "momentum": 0.9, "swa_epochs": 2}, "loss": "dice",
         "initial_weights": str(tmp_path / "init.weights.h5")},
    ]
    config = validate_config(tiny_raw_config(tiny_data, batch=2, augmentation={}, stages=stages, trainer={"workers": 2}))
    build_network(config).save_weights(str(tmp_path / "init.weights.h5"))
    out = train_cores(config, tmp_path / "run")
    workers = json.loads((out["model_run"] / WORKERS_FILE).read_text())["workers"]
    assert workers[0]["weights_sha256"] == workers[1]["weights_sha256"]
    assert len(list((out["model_run"] / "checkpoints").glob("stage1-*.weights.h5"))) == 1
    assert len(_history(out["model_run"])) == 4
