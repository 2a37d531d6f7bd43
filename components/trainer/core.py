"""Trainer: tf_keras segmentation model trained from the Examples and the TFT graph.

Input pipeline (tf.data): GZIP TFRecords -> decode (any bit depth, model channels)
-> resize -> cache -> shuffle -> albumentations policy -> batch -> TFT normalisation
-> prefetch. Stages run one after another on the same weights (each its own learning
rate). Writes the served model (`Format-Serving/`, TFT graph inside) and a model-run
folder with TensorBoard logs, `history.csv` and checkpoints.
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf
import tf_keras as keras

from segflow.augment import apply_policy, build_policy, example_seed
from segflow.config import ExperimentConfig
from segflow.examples import split_files
from segflow.io import atomic_dir, write_json
from segflow.losses import LabelSpec, build_loss
from segflow.models import ModelSpec, build_model
from segflow.runtime import log
from segflow.preprocessing import PixelSpec, model_pixels, scale_pixels
from segflow.serving import SegmentationServer, ServingSpec
from segflow.storage import localized

KERAS_FILE = "keras/model.keras"
HISTORY_FILE = "history.csv"
BACKUP_FOLDER = "backup"  # beside the trainer's outputs, not inside their temporary folders
CACHE_BUDGET_BYTES = 2 * 1024**3  # decoded, resized examples kept in RAM up to this size
SHUFFLE_BUFFER = 1024


def cache_bytes(examples: int, shape: list[int]) -> int:
    """RAM that caching a split needs: float32 image plus uint8 mask per example."""
    height, width, channels = shape
    return examples * height * width * (4 * channels + 1)


def _decode(record: tf.Tensor, shape: list[int], pixels: PixelSpec) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(image scaled to [0, 1] at the model size, mask at the model size, file name)."""
    height, width, channels = shape
    features = tf.io.parse_single_example(
        record,
        {
            "image": tf.io.FixedLenFeature([], tf.string),
            "mask": tf.io.FixedLenFeature([], tf.string),
            "bit_depth": tf.io.FixedLenFeature([], tf.int64),
            "filename": tf.io.FixedLenFeature([], tf.string),
        },
    )
    # decode_png as uint16 stretches 8-bit files by 257; undo that to keep raw counts.
    wide = tf.io.decode_png(features["image"], channels=0, dtype=tf.uint16)
    raw = tf.where(features["bit_depth"] == 8, wide // 257, wide)
    image = scale_pixels(model_pixels(raw[None], shape)[0], pixels.value_max)
    mask = tf.io.decode_png(features["mask"], channels=1)
    mask = tf.image.resize(mask, [height, width], method="nearest")[..., 0]
    return tf.ensure_shape(image, [height, width, channels]), tf.ensure_shape(tf.cast(mask, tf.uint8), [height, width]), features["filename"]


def _augmenter(config: ExperimentConfig) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]] | None:
    """A tf.data map function applying the albumentations policy with a per-example,
    per-epoch seed; each thread has its own policy object so seeding it is race-free."""
    if not config.augmentation:
        return None
    height, width, channels = config.shape
    local = threading.local()

    def augment(image: np.ndarray, mask: np.ndarray, filename: bytes, epoch: np.int64) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(local, "policy"):
            local.policy = build_policy(config.augmentation)
        return apply_policy(local.policy, image, mask, example_seed(config.seed, int(epoch), filename.decode()))

    def augment_tf(image: tf.Tensor, mask: tf.Tensor, filename: tf.Tensor, epoch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image, mask = tf.numpy_function(augment, [image, mask, filename, epoch], [tf.float32, tf.uint8], stateful=False)
        return tf.ensure_shape(image, [height, width, channels]), tf.ensure_shape(mask, [height, width])

    return augment_tf


def make_dataset(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    split: str,
    transform_layer: Any,
    pixels: PixelSpec,
    epochs: tuple[int, int] | None = None,
) -> tf.data.Dataset:
    """Batches of (normalised image, mask). With `epochs` (first, end) it is the training
    stream for those epochs: shuffled and augmented per epoch from seeds, so that the
    same data and config give the same batches whatever the thread scheduling."""
    from segflow.components.example_gen.core import read_counts
    from segflow.components.transform.core import RAW_FEATURE, TRANSFORMED_FEATURE

    records = tf.data.TFRecordDataset(split_files(examples_dir, split), compression_type="GZIP")
    decoded = records.map(lambda record: _decode(record, config.shape, pixels), num_parallel_calls=tf.data.AUTOTUNE)
    needed = cache_bytes(read_counts(examples_dir)[f"{split}_examples"], config.shape)
    if needed <= CACHE_BUDGET_BYTES:
        decoded = decoded.cache()
    else:  # decoding every epoch is slower than RAM, but never runs the machine out of memory
        log(f"trainer: {split} split needs {needed / 1024**3:.1f} GiB decoded; not caching it in RAM")
    if epochs is None:
        batches = decoded.map(lambda image, mask, _: (image, mask)).batch(config.batch)
    else:
        augment = _augmenter(config)

        def one_epoch(epoch: int) -> tf.data.Dataset:
            # One dataset per epoch with a Python seed: order and augmentation draws are
            # functions of (seed, epoch, file name), not of thread scheduling.
            shuffled = decoded.shuffle(SHUFFLE_BUFFER, seed=config.seed * 100_003 + epoch, reshuffle_each_iteration=False)
            if augment is None:
                examples = shuffled.map(lambda image, mask, _: (image, mask))
            else:
                examples = shuffled.map(lambda image, mask, name: augment(image, mask, name, tf.constant(epoch, tf.int64)), num_parallel_calls=tf.data.AUTOTUNE)
            return examples.batch(config.batch)

        batches = functools.reduce(tf.data.Dataset.concatenate, (one_epoch(epoch) for epoch in range(*epochs)))
    normalized = batches.map(
        lambda image, mask: (transform_layer({RAW_FEATURE: image})[TRANSFORMED_FEATURE], mask), num_parallel_calls=tf.data.AUTOTUNE
    )
    return normalized.prefetch(tf.data.AUTOTUNE)


class StreamingMeanIoU(keras.metrics.Metric):
    """Mean IoU from a confusion matrix accumulated over the epoch, ignore_index excluded."""

    def __init__(self, labels: LabelSpec, name: str = "mean_iou", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.labels = labels
        size = labels.num_labels
        self.matrix = self.add_weight("confusion", shape=(size, size), initializer="zeros", dtype=tf.float64)

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: tf.Tensor | None = None) -> None:
        labels = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        if self.labels.sigmoid:
            logits = y_pred[..., 0] if y_pred.shape.rank == 4 else y_pred
            predictions = tf.cast(logits > 0.0, tf.int32)
        else:
            predictions = tf.argmax(y_pred, axis=-1, output_type=tf.int32)
        predictions = tf.reshape(predictions, [-1])
        keep = labels < self.labels.num_labels
        matrix = tf.math.confusion_matrix(
            tf.boolean_mask(labels, keep), tf.boolean_mask(predictions, keep), num_classes=self.labels.num_labels, dtype=tf.float64
        )
        self.matrix.assign_add(matrix)

    def result(self) -> tf.Tensor:
        true_positive = tf.linalg.diag_part(self.matrix)
        union = tf.reduce_sum(self.matrix, 0) + tf.reduce_sum(self.matrix, 1) - true_positive
        present = union > 0
        return tf.reduce_mean(tf.boolean_mask(true_positive, present) / tf.boolean_mask(union, present))

    def reset_state(self) -> None:
        self.matrix.assign(tf.zeros_like(self.matrix))


def build_network(config: ExperimentConfig) -> keras.Model:
    spec = ModelSpec(
        shape=tuple(config.shape),
        output_channels=1 if config.sigmoid_head else config.num_labels,
        depth=config.model.depth,
        base_filters=config.model.base_filters,
        dropout=config.model.dropout,
        backbone=config.backbone,
    )
    return build_model(config.architecture, spec)


def run(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    transform_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    model_run_dir: str | os.PathLike[str],
) -> dict[str, Any]:
    """Train every stage, then write the served model. The inputs may be gs:// or s3:// URIs
    (copied to local disk first: tf.data cannot read s3 and the TFT graph wants a folder).
    A crash resumes from `backup/` beside `model_run_dir`: finished stages are skipped, the
    running one continues at its last epoch."""
    with localized(examples_dir) as local_examples, localized(transform_dir) as local_transform:
        return _train(config, local_examples, local_transform, model_dir, model_run_dir)


def _train(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    transform_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    model_run_dir: str | os.PathLike[str],
) -> dict[str, Any]:
    from segflow.components.example_gen.core import read_counts
    from segflow.components.transform.core import transform_layer

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    labels = LabelSpec(config.num_labels, config.sigmoid_head, config.ignore_index)
    pixels = PixelSpec.load(transform_dir)
    tft_layer = transform_layer(transform_dir)
    steps_per_epoch = math.ceil(read_counts(examples_dir)["train_examples"] / config.batch)
    validation = make_dataset(config, examples_dir, "eval", tft_layer, pixels)
    network = build_network(config)
    log(f"trainer: {config.architecture}/{config.backbone}, {network.count_params():,} parameters, {config.total_epochs} epochs")
    backup = Path(model_run_dir).parent / BACKUP_FOLDER
    backup.mkdir(parents=True, exist_ok=True)
    with atomic_dir(model_run_dir) as run_out:
        first_epoch = 0
        history: dict[str, list[float]] = {}
        for number, stage in enumerate(config.stages, start=1):
            finished = backup / f"stage-{number}.weights.h5"
            if finished.exists():
                network.load_weights(str(finished))
                log(f"trainer: stage {number}/{len(config.stages)} finished before a restart; weights restored from {finished}")
                first_epoch += stage.epochs
                continue
            log(f"trainer: stage {number}/{len(config.stages)}: {stage.epochs} epochs at learning rate {stage.learning_rate}")
            network.compile(
                optimizer=keras.optimizers.Adam(stage.learning_rate),
                loss=build_loss(config.loss, labels),
                metrics=[StreamingMeanIoU(labels)],
            )
            callbacks = [
                keras.callbacks.BackupAndRestore(str(backup / f"stage-{number}"), delete_checkpoint=True),
                keras.callbacks.CSVLogger(str(backup / HISTORY_FILE), append=True),
                keras.callbacks.TensorBoard(log_dir=str(run_out / "logs"), profile_batch=0),
                keras.callbacks.ModelCheckpoint(str(run_out / "checkpoints" / "last.weights.h5"), save_weights_only=True),
            ]
            end_epoch = first_epoch + stage.epochs
            train = make_dataset(config, examples_dir, "train", tft_layer, pixels, epochs=(first_epoch, end_epoch))
            fit = network.fit(
                train,
                validation_data=validation,
                steps_per_epoch=steps_per_epoch,
                initial_epoch=first_epoch,
                epochs=end_epoch,
                callbacks=callbacks,
                verbose=2,
            )
            _save_weights_atomically(network, finished)
            first_epoch = end_epoch
            for key, values in fit.history.items():
                history.setdefault(key, []).extend(float(value) for value in values)
        shutil.copyfile(backup / HISTORY_FILE, run_out / HISTORY_FILE)
        final = {key: values[-1] for key, values in history.items()}
        write_json(run_out / "final_metrics.json", final)
    with atomic_dir(model_dir) as model_out:
        (model_out / KERAS_FILE).parent.mkdir()
        network.save(str(model_out / KERAS_FILE))
        spec = ServingSpec(
            tuple(config.shape), tuple(config.class_names), config.sigmoid_head, config.ignore_index, pixels.input_dtype, pixels.value_max
        )
        SegmentationServer(network, tft_layer, spec).save(model_out)
    shutil.rmtree(backup)  # the run is complete; nothing left to resume
    log(f"trainer: final loss {final.get('loss', float('nan')):.4f}, validation mean IoU {final.get('val_mean_iou', float('nan')):.4f}")
    return final


def _save_weights_atomically(network: keras.Model, target: Path) -> None:
    partial = target.with_name(f".partial-{target.name}")  # the suffix picks the format: keep .weights.h5
    network.save_weights(str(partial))
    os.replace(partial, target)
