"""The `qat` fine-tune after the stages, moved out of the trainer core: a fake-quantized copy
of the final network (segflow.model.qat) trained a few more epochs for the tflite_int8_qat
export; the float model the stages trained stays the served one.
"""
from __future__ import annotations

import math
import os
from typing import Any

import tensorflow as tf
import tf_keras as keras

from segflow.config.experiment import ExperimentConfig
from segflow.data.preprocessing import PixelSpec
from segflow.model.losses import LabelSpec
from segflow.train.input_pipeline import make_dataset, train_inputs
from segflow.train.network import compile_network, network_spec
from segflow.train.progress import EpochLine
from segflow.utils.runtime import log


def fine_tune_qat(
    config: ExperimentConfig,
    network: keras.Model,
    labels: LabelSpec,
    examples_dir: str | os.PathLike[str],
    tft_layer: Any,
    pixels: PixelSpec,
    validation: tf.data.Dataset,
) -> keras.Model:
    """The `qat` fine-tune (segflow.model.qat) of the final network, on the chief alone outside any
    strategy: the float model is already final, this copy is for the tflite_int8_qat export.
    Its epochs continue the training stream's numbering, so its augmentations are new ones."""
    from segflow.model.qat import quantization_aware

    settings, start = config.qat, config.total_epochs
    tuned = quantization_aware(network, config.architecture, network_spec(config))
    compile_network(tuned, config, labels, keras.optimizers.Adam(settings.learning_rate))
    log(f"trainer: quantization-aware training (tensorflow-model-optimization): {settings.epochs} epochs at learning rate {settings.learning_rate:g}")
    fit = tuned.fit(
        make_dataset(config, examples_dir, "train", tft_layer, pixels, epochs=(start, start + settings.epochs)),
        validation_data=validation,
        steps_per_epoch=math.ceil(train_inputs(config, examples_dir) / config.batch),
        initial_epoch=start,
        epochs=start + settings.epochs,
        callbacks=[EpochLine("trainer: quantization-aware training", settings.epochs, first=start)],
        verbose=2,
    )
    log(f"trainer: quantization-aware model: validation mean IoU {fit.history['val_mean_iou'][-1]:.4f} (fake-quantized)")
    return tuned
