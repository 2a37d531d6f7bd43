"""The learning-rate sweep behind `segflow lr-find` (segflow/pipelines/lr_find.py), moved out of
the trainer core: one training step at each rate in turn, on the first stage's network,
freezing, optimizer and loss, over the trainer's own augmented train stream.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable

import numpy as np
import tensorflow as tf
import tf_keras as keras

from segflow.config.experiment import ExperimentConfig
from segflow.data.preprocessing import PixelSpec
from segflow.model.losses import LabelSpec, resolve_class_weights
from segflow.model.models import apply_stage_freeze
from segflow.train.input_pipeline import make_dataset, train_inputs
from segflow.train.network import build_network, compile_network
from segflow.train.optimizers import build_optimizer


def sweep_learning_rate(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    transform_dir: str | os.PathLike[str],
    rates: np.ndarray,
    divergence: float,
    transform_layer: Callable[[str | os.PathLike[str]], Any],
) -> list[float]:
    """The training loss of one step at each of `rates` in turn (the first stage's network,
    freezing, optimizer and loss on the augmented train stream), stopping early once a loss
    is not finite or exceeds `divergence` times the lowest so far. For `segflow lr-find` (segflow/pipelines/lr_find.py).
    `transform_layer` loads the TFT graph from `transform_dir` (segflow.components.transform.core's:
    segflow.train sits below the components)."""
    keras.utils.set_random_seed(config.seed)
    stage = config.stages[0]
    labels = LabelSpec(config.num_labels, config.sigmoid_head, config.ignore_index, resolve_class_weights(config.class_weights, examples_dir, config.class_names))
    network = build_network(config)
    apply_stage_freeze(network, config.model, stage)
    compile_network(network, config, labels, build_optimizer(stage.optimizer or config.optimizer, float(rates[0])), stage.loss)
    steps_per_epoch = math.ceil(train_inputs(config, examples_dir) / config.batch)
    epochs = math.ceil(len(rates) / steps_per_epoch)
    train = make_dataset(config, examples_dir, "train", transform_layer(transform_dir), PixelSpec.load(transform_dir), epochs=(0, epochs))
    step = tf.function(lambda images, masks: network.train_step((images, masks))["loss"])
    losses: list[float] = []
    for value, (images, masks) in zip(rates, train):
        network.optimizer.learning_rate = float(value)  # assigns the optimizer's rate variable
        network.reset_metrics()  # the compiled loss is a running mean: one batch each
        loss = float(step(images, masks))
        if not math.isfinite(loss):
            break
        losses.append(loss)
        if loss > divergence * min(losses):
            break
    return losses
