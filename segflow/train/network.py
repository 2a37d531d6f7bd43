"""The networks a training run builds and how each is compiled, moved out of the trainer core:
the one that trains (in the strategy's scope, under `trainer.mixed_precision`), the plain
float32 copies (initial weights, SWA statistics, the served model, QAT, the lr sweep), and
the one compile every one of them gets (loss and metrics from the config).
"""
from __future__ import annotations

from typing import Any

import tensorflow as tf
import tf_keras as keras

from segflow.config.experiment import ExperimentConfig
from segflow.model.losses import LabelSpec, build_loss
from segflow.model.metrics import SegmentationMetrics
from segflow.model.models import ModelSpec, build_model, model_spec
from segflow.train.distribute import Plan
from segflow.utils.runtime import log


def network_spec(config: ExperimentConfig) -> ModelSpec:
    """The model's shape, outputs, backbone and settings, as segflow.model.models builds it."""
    return model_spec(config.shape, 1 if config.sigmoid_head else config.num_labels, config.backbone, config.model)


def build_network(config: ExperimentConfig) -> keras.Model:
    """A fresh float32 network outside any strategy scope."""
    return build_model(config.architecture, network_spec(config))


def build_trained_network(config: ExperimentConfig, plan: Plan) -> keras.Model:
    """The network to train, in the strategy's scope and under `trainer.mixed_precision`'s
    policy (its layers keep it; the global policy is restored, so every other copy is float32)."""
    policy = keras.mixed_precision.global_policy()
    if config.trainer.mixed_precision:
        keras.mixed_precision.set_global_policy(config.trainer.mixed_precision)
        if not tf.config.list_physical_devices("GPU"):
            log(f"trainer: note: {config.trainer.mixed_precision} on a CPU is usually slower than float32 (no float16 units); it pays on GPUs and TPUs")
    try:
        with plan.strategy.scope():
            return build_network(config)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def compile_network(
    network: keras.Model, config: ExperimentConfig, labels: LabelSpec, optimizer: Any, loss: str | None = None, jit_compile: bool = False
) -> None:
    """The loss (a stage's own, else the config's) and metrics of every compile: training
    stages (with `trainer.jit_compile`) and the chief's served copy."""
    metrics = SegmentationMetrics(labels.num_labels, labels.sigmoid, config.class_names)
    network.compile(optimizer=optimizer, loss=build_loss(loss or config.loss, labels), metrics=[metrics], jit_compile=jit_compile)
