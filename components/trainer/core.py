"""Trainer: tf_keras segmentation model trained from the Examples and the TFT graph.

Input pipeline (tf.data): GZIP TFRecords -> decode (any bit depth, model channels)
-> resize -> cache -> shuffle -> albumentations policy -> batch -> TFT normalisation
-> prefetch. Stages run one after another on the same weights (each its own learning
rate). Writes the served model (`Format-Serving/`, TFT graph inside) and a model-run
folder with TensorBoard logs, `history.csv` and checkpoints.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from segflow.augment import apply_policy, build_policy
from segflow.config import ExperimentConfig
from segflow.examples import split_files
from segflow.io import atomic_dir, write_json
from segflow.losses import LabelSpec, build_loss
from segflow.models import ModelSpec, build_model
from segflow.runtime import log
from segflow.serving import SegmentationServer, ServingSpec, resize_to_model

KERAS_FILE = "keras/model.keras"
HISTORY_FILE = "history.csv"
CACHE_BUDGET_BYTES = 2 * 1024**3  # decoded, resized examples kept in RAM up to this size


def cache_bytes(examples: int, shape: list[int]) -> int:
    """RAM that caching a split needs: float32 image plus uint8 mask per example."""
    height, width, channels = shape
    return examples * height * width * (4 * channels + 1)


def _decode(record: tf.Tensor, height: int, width: int, channels: int) -> tuple[tf.Tensor, tf.Tensor]:
    features = tf.io.parse_single_example(
        record, {"image": tf.io.FixedLenFeature([], tf.string), "mask": tf.io.FixedLenFeature([], tf.string)}
    )
    # uint16 decoding maps 8-bit PNGs onto the same [0, 65535] range, so both bit depths share one scale.
    image = tf.io.decode_png(features["image"], channels=channels, dtype=tf.uint16)
    image = resize_to_model(tf.cast(image, tf.float32) / 65535.0, height, width)
    mask = tf.io.decode_png(features["mask"], channels=1)
    mask = tf.image.resize(mask, [height, width], method="nearest")[..., 0]
    return tf.ensure_shape(image, [height, width, channels]), tf.ensure_shape(tf.cast(mask, tf.uint8), [height, width])


def make_dataset(
    config: ExperimentConfig, examples_dir: str | os.PathLike[str], split: str, transform_layer: Any, training: bool
) -> tf.data.Dataset:
    from segflow.components.example_gen.core import read_counts
    from segflow.components.transform.core import RAW_FEATURE, TRANSFORMED_FEATURE

    height, width, channels = config.shape
    dataset = tf.data.TFRecordDataset(split_files(examples_dir, split), compression_type="GZIP")
    dataset = dataset.map(lambda record: _decode(record, height, width, channels), num_parallel_calls=tf.data.AUTOTUNE)
    needed = cache_bytes(read_counts(examples_dir)[f"{split}_examples"], config.shape)
    if needed <= CACHE_BUDGET_BYTES:
        dataset = dataset.cache()
    else:  # decoding every epoch is slower than RAM, but never runs the machine out of memory
        log(f"trainer: {split} split needs {needed / 1024**3:.1f} GiB decoded; not caching it in RAM")
    if training:
        dataset = dataset.shuffle(1024, seed=config.seed, reshuffle_each_iteration=True)
        policy = build_policy(config.augmentation, seed=config.seed)
        if policy is not None:

            def augment(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return apply_policy(policy, image, mask)

            def augment_tf(image: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                image, mask = tf.numpy_function(augment, [image, mask], [tf.float32, tf.uint8], stateful=True)
                return tf.ensure_shape(image, [height, width, channels]), tf.ensure_shape(mask, [height, width])

            dataset = dataset.map(augment_tf, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(config.batch)
    dataset = dataset.map(
        lambda image, mask: (transform_layer({RAW_FEATURE: image})[TRANSFORMED_FEATURE], mask), num_parallel_calls=tf.data.AUTOTUNE
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


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
    from segflow.components.transform.core import transform_layer

    keras.utils.set_random_seed(config.seed)
    labels = LabelSpec(config.num_labels, config.sigmoid_head, config.ignore_index)
    tft_layer = transform_layer(transform_dir)
    train = make_dataset(config, examples_dir, "train", tft_layer, training=True)
    validation = make_dataset(config, examples_dir, "eval", tft_layer, training=False)
    network = build_network(config)
    log(f"trainer: {config.architecture}/{config.backbone}, {network.count_params():,} parameters, {config.total_epochs} epochs")
    with atomic_dir(model_run_dir) as run_out:
        callbacks = [
            keras.callbacks.CSVLogger(str(run_out / HISTORY_FILE), append=True),
            keras.callbacks.TensorBoard(log_dir=str(run_out / "logs"), profile_batch=0),
            keras.callbacks.ModelCheckpoint(str(run_out / "checkpoints" / "last.weights.h5"), save_weights_only=True),
        ]
        first_epoch = 0
        history: dict[str, list[float]] = {}
        for number, stage in enumerate(config.stages, start=1):
            log(f"trainer: stage {number}/{len(config.stages)}: {stage.epochs} epochs at learning rate {stage.learning_rate}")
            network.compile(
                optimizer=keras.optimizers.Adam(stage.learning_rate),
                loss=build_loss(config.loss, labels),
                metrics=[StreamingMeanIoU(labels)],
            )
            fit = network.fit(
                train, validation_data=validation, initial_epoch=first_epoch, epochs=first_epoch + stage.epochs, callbacks=callbacks, verbose=2
            )
            first_epoch += stage.epochs
            for key, values in fit.history.items():
                history.setdefault(key, []).extend(float(value) for value in values)
        final = {key: values[-1] for key, values in history.items()}
        write_json(run_out / "final_metrics.json", final)
    with atomic_dir(model_dir) as model_out:
        (model_out / KERAS_FILE).parent.mkdir()
        network.save(str(model_out / KERAS_FILE))
        spec = ServingSpec(tuple(config.shape), tuple(config.class_names), config.sigmoid_head, config.ignore_index)
        SegmentationServer(network, tft_layer, spec).save(model_out)
    log(f"trainer: final loss {final['loss']:.4f}, validation mean IoU {final.get('val_mean_iou', float('nan')):.4f}")
    return final
