"""A stage's configured callbacks: early stopping, the N best checkpoints, the weights the
stage ends with (best or last), and panels of predictions on a few eval images (PNGs and
TensorBoard images), plus the resolved config as TensorBoard text.

All decisions read the epoch's logs, whose validation metrics every worker of a
multi-worker run shares, so every worker keeps the same files and restores the same weights
(each in its own folder: only the chief's are kept).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras
from PIL import Image

from segflow.config.experiment import CallbacksConfig

CHECKPOINTS_FOLDER = "checkpoints"
PREDICTIONS_FOLDER = "predictions"
TENSORBOARD_IMAGES = "images"  # beside Keras' train/ and validation/ in the TensorBoard log folder
TENSORBOARD_CONFIG = "config"


def early_stopping(settings: CallbacksConfig) -> list[keras.callbacks.Callback]:
    if settings.early_stopping is None:
        return []
    return [
        keras.callbacks.EarlyStopping(
            monitor=settings.monitor, mode=settings.monitor_mode, patience=settings.early_stopping.patience, min_delta=settings.early_stopping.min_delta
        )
    ]


class KeepBest(keras.callbacks.Callback):
    """Keeps the `keep` best epochs' weights of a stage by the monitored metric as
    `stage<S>-epoch<E>-<monitor><value>.weights.h5`, deleting those that drop out; with
    `restore` the stage ends with the best of them. The best weights are also held in memory
    and restored with set_weights: tf_keras cannot load an .h5 file into a model built under
    MultiWorkerMirroredStrategy."""

    def __init__(self, folder: Path, stage: int, settings: CallbacksConfig) -> None:
        super().__init__()
        self.folder = folder
        self.stage = stage
        self.settings = settings
        self.sign = 1.0 if settings.monitor_mode == "max" else -1.0
        self.kept: list[tuple[float, Path]] = []  # (signed score, file), best first
        self.best_weights: list[np.ndarray] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        value = (logs or {}).get(self.settings.monitor)
        if value is None:
            raise KeyError(f"callbacks.monitor {self.settings.monitor!r} is not among this epoch's logs: {sorted(logs or {})}")
        score = self.sign * float(value)
        if not math.isfinite(score) or (len(self.kept) == self.settings.keep_best and score <= self.kept[-1][0]):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"stage{self.stage}-epoch{epoch + 1:03d}-{self.settings.monitor}{float(value):.4f}.weights.h5"
        self.model.save_weights(str(path))
        if not self.kept or score > self.kept[0][0]:
            self.best_weights = self.model.get_weights()
        self.kept = sorted([*self.kept, (score, path)], key=lambda entry: -entry[0])
        for _, dropped in self.kept[self.settings.keep_best :]:
            dropped.unlink(missing_ok=True)
        self.kept = self.kept[: self.settings.keep_best]

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.settings.restore == "best" and self.best_weights:
            self.model.set_weights(self.best_weights)


def _display(image: np.ndarray) -> np.ndarray:
    """A normalised model input stretched to uint8 RGB for viewing."""
    low, high = float(image.min()), float(image.max())
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    rgb = np.repeat(scaled, 3, axis=-1) if image.shape[-1] == 1 else scaled
    return (rgb * 255).astype(np.uint8)


def _colour(labels: np.ndarray, num_labels: int, ignore_index: int | None) -> np.ndarray:
    """Class ids as colours (the preview palette, background black, ignored white)."""
    from segflow.train.preview import IGNORED_COLOUR, PALETTE

    rgb = np.zeros((*labels.shape, 3), np.float32)
    for label in range(1, num_labels):
        rgb[labels == label] = PALETTE[(label - 1) % len(PALETTE)]
    if ignore_index is not None:
        rgb[labels == ignore_index] = IGNORED_COLOUR
    return rgb.astype(np.uint8)


class LivePredictions(keras.callbacks.Callback):
    """Every `every` epochs, `predictions/epoch<E>.png`: one row per eval image with the
    image, its truth and the model's prediction, to watch the model learn; the same rows as
    TensorBoard images (`<log_dir>/images`, one step per epoch) when `log_dir` is given."""

    def __init__(
        self, folder: Path, every: int, images: tf.Tensor, masks: tf.Tensor, num_labels: int, ignore_index: int | None, log_dir: Path | None = None
    ) -> None:
        super().__init__()
        self.folder = folder
        self.every = every
        self.images = images
        self.masks = masks.numpy()
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.log_dir = log_dir

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if (epoch + 1) % self.every:
            return
        logits = self.model(self.images, training=False).numpy()
        predicted = (logits[..., 0] > 0).astype(np.uint8) if logits.shape[-1] == 1 else logits.argmax(-1).astype(np.uint8)
        rows = [
            np.concatenate([_display(image), _colour(mask, self.num_labels, self.ignore_index), _colour(guess, self.num_labels, None)], axis=1)
            for image, mask, guess in zip(self.images.numpy(), self.masks, predicted)
        ]
        self.folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(rows, axis=0)).save(self.folder / f"epoch{epoch + 1:03d}.png")
        if self.log_dir is not None:
            with tf.summary.create_file_writer(str(self.log_dir / TENSORBOARD_IMAGES)).as_default():
                tf.summary.image("image | truth | prediction", np.stack(rows), step=epoch + 1, max_outputs=len(rows))


def write_config_text(log_dir: Path, settings_yaml: str) -> None:
    """The settings a model trained with as TensorBoard text (`<log_dir>/config`), so a
    TensorBoard of many runs shows what each one trained with."""
    with tf.summary.create_file_writer(str(log_dir / TENSORBOARD_CONFIG)).as_default():
        tf.summary.text("config", f"```\n{settings_yaml}\n```", step=0)


def live_predictions(
    settings: CallbacksConfig, folder: Path, validation: tf.data.Dataset, num_labels: int, ignore_index: int | None, log_dir: Path | None = None
) -> list[keras.callbacks.Callback]:
    """The predictions callback on the first `prediction_images` of the eval stream, or none."""
    if not settings.predictions_every:
        return []
    images, masks = next(iter(validation.unbatch().batch(settings.prediction_images).take(1)))
    return [LivePredictions(folder, settings.predictions_every, images, masks, num_labels, ignore_index, log_dir)]
