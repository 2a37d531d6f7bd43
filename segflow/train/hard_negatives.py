"""The trainer's side of hard negatives (`patches.hard_negatives`), moved out of the trainer core:
the train split's error maps, which the training stream's crops read
(segflow.train.input_pipeline), and the callback that refreshes them from the network's
predictions as it trains. The maps and the refresh themselves are segflow.data.error_maps.
"""
from __future__ import annotations

import os
from typing import Any

import tensorflow as tf
import tf_keras as keras

from segflow.config.experiment import ExperimentConfig
from segflow.data.error_maps import ErrorMaps, RefreshErrorMaps
from segflow.data.preprocessing import PixelSpec
from segflow.train.input_pipeline import decode_example, split_records
from segflow.utils.runtime import log


def train_error_maps(config: ExperimentConfig, examples_dir: str | os.PathLike[str]) -> ErrorMaps | None:
    """The hard negatives' error maps of the train split (`patches.hard_negatives`), or None."""
    settings = config.patches.hard_negatives
    if settings is None:
        return None
    records = split_records(examples_dir, "train")
    names = records.map(lambda record: tf.io.parse_single_example(record, {"filename": tf.io.FixedLenFeature([], tf.string)})["filename"])
    return ErrorMaps([name.decode() for name in names.as_numpy_iterator()], settings.refresh_every, settings.keep, config.seed)


def refresh_error_maps(
    config: ExperimentConfig, examples_dir: str | os.PathLike[str], maps: ErrorMaps, network: keras.Model, transform_layer: Any, pixels: PixelSpec, end_epoch: int
) -> RefreshErrorMaps:
    """The callback that predicts the full-resolution train images (TFT graph, then the network) for `maps`."""
    from segflow.data.preprocessing import RAW_FEATURE, TRANSFORMED_FEATURE
    from segflow.model.losses import probabilities

    records = split_records(examples_dir, "train")
    examples = records.map(lambda record: decode_example(record, config, pixels))

    def predict(tiles: tf.Tensor) -> tf.Tensor:
        return probabilities(network(transform_layer({RAW_FEATURE: tiles})[TRANSFORMED_FEATURE], training=False), config.sigmoid_head)

    tile = (config.shape[0], config.shape[1])
    return RefreshErrorMaps(maps, end_epoch, examples, predict, tile, config.ignore_index, lambda text: log(f"trainer: {text}"))
