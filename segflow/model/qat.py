"""Quantization-aware training with tensorflow-model-optimization (tfmot).

Post-training int8 calibrates activation ranges on a few images and rounds weights the
network never saw rounded. QAT fine-tunes a copy of the trained network with fake-quantize
ops on weights and activations, so the network learns around int8's rounding, and the
TFLite converter then takes its learned ranges. The trainer runs it after its stages when
the config has `qat:` and saves the result as a second served model (serving.QAT_SERVING_SUBDIR)
that the exporter's `tflite_int8_qat` row converts to full integer.
"""
from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tfmot builds on tf_keras (Keras 2), as segflow's models do

import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402

from segflow.model.models import (  # noqa: E402
    DepthToSpace,
    ModelSpec,
    PixelRearrange,
    SpaceToDepth,
    build_model,
)


class PassThroughQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
    """Pixel (un)shuffle only moves values between positions and channels: nothing of its
    own to quantize, and its input's range is its output's."""

    def get_weights_and_quantizers(self, layer: keras.layers.Layer) -> list[Any]:
        return []

    def get_activations_and_quantizers(self, layer: keras.layers.Layer) -> list[Any]:
        return []

    def set_quantize_weights(self, layer: keras.layers.Layer, quantize_weights: list[Any]) -> None:
        pass

    def set_quantize_activations(self, layer: keras.layers.Layer, quantize_activations: list[Any]) -> None:
        pass

    def get_output_quantizers(self, layer: keras.layers.Layer) -> list[Any]:
        return []

    def get_config(self) -> dict[str, Any]:
        return {}


def _all_layers(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """Layers by name, nested models' layers included (the encoder is a nested model)."""
    found: dict[str, keras.layers.Layer] = {}
    for layer in model.layers:
        found[layer.name] = layer
        if isinstance(layer, keras.Model):
            found.update(_all_layers(layer))
    return found


def flat_copy(network: keras.Model, architecture: str, spec: ModelSpec) -> keras.Model:
    """The trained `network` rebuilt with its encoder's layers inline and its weights copied
    by layer name: tfmot cannot quantize a model nested in a model."""
    flat = build_model(architecture, spec, nested_encoder=False)
    trained = _all_layers(network)
    for layer in flat.layers:
        if layer.weights:
            layer.set_weights(trained[layer.name].get_weights())
    return flat


def quantization_aware(network: keras.Model, architecture: str, spec: ModelSpec) -> keras.Model:
    """A fake-quantized copy of `network` (tfmot's default 8-bit scheme: per-channel
    weights, per-tensor activations, as the TFLite int8 kernels), ready to fine-tune."""
    flat = flat_copy(network, architecture, spec)

    def annotate(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, PixelRearrange):
            return tfmot.quantization.keras.quantize_annotate_layer(layer, PassThroughQuantizeConfig())
        return tfmot.quantization.keras.quantize_annotate_layer(layer) if not isinstance(layer, keras.layers.InputLayer) else layer

    annotated = keras.models.clone_model(flat, clone_function=annotate)
    annotated.set_weights(flat.get_weights())
    with tfmot.quantization.keras.quantize_scope(
        {"PassThroughQuantizeConfig": PassThroughQuantizeConfig, "SpaceToDepth": SpaceToDepth, "DepthToSpace": DepthToSpace}
    ):
        return tfmot.quantization.keras.quantize_apply(annotated)
