"""Quantization-aware training (segflow.model.qat, tensorflow-model-optimization): every
architecture on a built-in encoder gets a fake-quantized copy that starts from the trained
weights, fine-tunes, converts to full-integer TFLite and runs in LiteRT; configs that
cannot work fail at validation. The trainer + exporter round trip of `tflite_int8_qat` is
in tests/export/test_exporters.py (the session's trained model has `qat`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from segflow.config.experiment import validate_config

from segflow.utils.errors import ConfigError
from segflow.model.models import ModelSpec, build_model
from segflow.model.qat import flat_copy, quantization_aware
from segflow.utils.registry import ARCHITECTURES
from tests.conftest import tiny_raw_config

SHAPE = (32, 32, 1)


def _spec(backbone: str, pixel_shuffle: int = 1) -> ModelSpec:
    return ModelSpec(SHAPE, 3, depth=2 if backbone == "simple" else None, base_filters=4, backbone=backbone, pixel_shuffle=pixel_shuffle)


def test_flat_copy_computes_what_the_nested_network_computes() -> None:
    spec = _spec("resnet18")
    nested = build_model("unet", spec)
    images = np.random.default_rng(0).normal(size=(2, *SHAPE)).astype(np.float32)
    np.testing.assert_allclose(flat_copy(nested, "unet", spec)(images), nested(images), atol=1e-5)


def _int8(model: keras.Model, sample: np.ndarray) -> bytes:
    signature = tf.function(lambda pixels: model(pixels, training=False), input_signature=[tf.TensorSpec([1, *SHAPE], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([signature.get_concrete_function()], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: iter([[sample[:1]]])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.uint8
    return converter.convert()


@pytest.mark.parametrize(
    ("architecture", "backbone", "pixel_shuffle"),
    [
        *((name, "simple", 1) for name in ARCHITECTURES.names()),
        ("unet", "simple", 2),
        pytest.param("linknet", "resnet18", 1, marks=pytest.mark.slow),  # 45 s on 2 cores: `make test-slow`
    ],
)
def test_quantization_aware_copy_fine_tunes_and_runs_as_int8(architecture: str, backbone: str, pixel_shuffle: int) -> None:
    from ai_edge_litert.interpreter import Interpreter

    spec = _spec(backbone, pixel_shuffle)
    trained = build_model(architecture, spec)
    rng = np.random.default_rng(1)
    images = rng.normal(size=(4, *SHAPE)).astype(np.float32)
    labels = (images[..., 0] > 0).astype(np.int32) + (images[..., 0] > 1)
    tuned = quantization_aware(trained, architecture, spec)
    assert any("quantize" in layer.name for layer in tuned.layers)  # fake-quantize wrappers, not the float layers
    tuned.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # The copy starts from the trained weights (the wrapper holds the float layer it fake-quantizes).
    (kernel,) = [weight for weight in tuned.get_layer("quant_logits").weights if weight.name.endswith("kernel:0")]
    np.testing.assert_array_equal(kernel.numpy(), trained.get_layer("logits").kernel.numpy())
    losses = tuned.fit(images, labels, epochs=3, batch_size=4, verbose=0).history["loss"]
    assert np.isfinite(losses).all()
    interpreter = Interpreter(model_content=_int8(tuned, images))
    interpreter.allocate_tensors()
    (entry,), (exit_,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert entry["dtype"] == np.uint8 and exit_["dtype"] == np.uint8
    interpreter.set_tensor(entry["index"], np.full((1, *SHAPE), 128, np.uint8))
    interpreter.invoke()
    assert interpreter.get_tensor(exit_["index"]).shape == (1, *SHAPE[:2], 3)


def test_qat_export_needs_the_qat_section(tiny_data: Path) -> None:
    with pytest.raises(ConfigError, match=r"tflite_int8_qat .* add `qat: \{epochs: 2\}`"):
        validate_config(tiny_raw_config(tiny_data, export=["saved_model", "tflite_int8_qat"]))
    config = validate_config(tiny_raw_config(tiny_data, export=["tflite_int8_qat"], qat={"epochs": 1}))
    assert config.qat is not None and config.qat.learning_rate == 1e-4


def test_qat_refuses_applications_backbones(tiny_data: Path) -> None:
    with pytest.raises(ConfigError, match="cannot quantize backbone mobilenetv2"):
        validate_config(tiny_raw_config(tiny_data, shape=[64, 64, 3], backbone="mobilenetv2", model={}, qat={"epochs": 1}))
