"""Architectures and backbones, looped over their registries: every architecture on the
built-in encoders trains a step, every backbone (tf_keras.applications included, random
initialisation) builds its pyramid and feeds a U-Net, every architecture converts to a
full-integer TFLite model that LiteRT runs. The heaviest applications are `slow`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from segflow.config.experiment import validate_config

from segflow.utils.errors import ConfigError
from segflow.model.models import (
    APPLICATIONS,
    ENCODER,
    INPUT_ADAPTER,
    DepthToSpace,
    ModelSpec,
    SpaceToDepth,
    apply_stage_freeze,
    build_model,
    set_encoder_trainable,
)
from segflow.utils.registry import ARCHITECTURES, BACKBONES

# Applications that take more than a few seconds to build on 2 cores: `make test-slow`.
SLOW_BACKBONES = {
    "resnet101", "resnet152", "resnet101v2", "resnet152v2", "densenet169", "densenet201", "inceptionresnetv2", "mobilenetv3large",
    *(f"efficientnetb{variant}" for variant in range(1, 8)),
    *(f"efficientnetv2{variant}" for variant in ("b1", "b2", "b3", "s", "m", "l")),
}


def _batch(shape: tuple[int, int, int], outputs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(2, *shape)).astype(np.float32)
    labels = rng.integers(0, max(outputs, 2), size=(2, *shape[:2])).astype(np.int32)
    return images, labels


def _compile(model: keras.Model, outputs: int) -> None:
    loss = keras.losses.BinaryCrossentropy(from_logits=True) if outputs == 1 else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # Eager steps: tracing a train function costs seconds per model, the step itself milliseconds.
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, run_eagerly=True)


@pytest.mark.parametrize("architecture", ARCHITECTURES.names())
@pytest.mark.parametrize("backbone", ["simple", "resnet18"])
@pytest.mark.parametrize(("channels", "outputs"), [(1, 1), (3, 3)])
def test_architecture_trains_a_step_on_builtin_encoders(architecture: str, backbone: str, channels: int, outputs: int) -> None:
    shape = (64, 64, channels)
    model = build_model(architecture, ModelSpec(shape, outputs, base_filters=8, backbone=backbone))
    images, labels = _batch(shape, outputs)
    assert model(images).shape == (2, 64, 64, outputs)
    _compile(model, outputs)
    before = [weight.copy() for weight in model.get_weights()]
    loss = model.train_on_batch(images, labels[..., None].astype(np.float32) if outputs == 1 else labels)
    assert np.isfinite(loss)
    assert any(not np.array_equal(old, new) for old, new in zip(before, model.get_weights()))


def _backbone_params() -> list:
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_BACKBONES else name for name in BACKBONES.names()]


@pytest.mark.parametrize("backbone", _backbone_params())
def test_backbone_pyramid_feeds_a_unet(backbone: str) -> None:
    entry = BACKBONES.get(backbone)
    size = 32 * max(2, -(-entry.min_size // 32))  # 64, or the smallest multiple of 32 the stem accepts
    model = build_model("unet", ModelSpec((size, size, 3), 2, base_filters=4, backbone=backbone))
    pyramid = model.get_layer(ENCODER).outputs
    levels = range(entry.first_level, entry.first_level + len(pyramid))
    assert len(pyramid) == entry.default_depth - entry.first_level + 1
    sizes = [int(feature.shape[1]) for feature in pyramid]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), f"pyramid sizes {sizes}"
    for level, feature in zip(levels, pyramid):  # valid-padded stems lose a few pixels per level
        nominal = size / 2**level
        assert nominal / 4 <= feature.shape[1] <= nominal + 1, f"level {level}: {feature.shape} at input {size}"
    assert model.output_shape == (None, size, size, 2)


@pytest.mark.parametrize("channels", [1, 4])
def test_applications_take_any_channel_count_without_weights(channels: int) -> None:
    model = build_model("fpn", ModelSpec((64, 64, channels), 2, base_filters=4, backbone="mobilenetv3small"))
    assert model(np.zeros((1, 64, 64, channels), np.float32)).shape == (1, 64, 64, 2)


def test_sizes_must_be_multiples_of_the_total_stride() -> None:
    with pytest.raises(ConfigError, match=r"shape 48x48x3: unet on backbone resnet18 \(depth 5\) needs height and width divisible by 32"):
        build_model("unet", ModelSpec((48, 48, 3), 2, backbone="resnet18"))
    with pytest.raises(ConfigError, match="at least 75"):
        build_model("unet", ModelSpec((64, 64, 3), 2, backbone="inceptionv3"))
    raw = {"name": "x", "dataset": {"images": "i", "masks": "m"}, "shape": [80, 80, 3], "backbone": "resnet34"}
    with pytest.raises(ConfigError, match="divisible by 32.*e.g. 96x96"):
        validate_config(raw)
    # PSPNet reads the stride-8 features only: 80 is a multiple of 8
    assert validate_config({**raw, "architecture": "pspnet"}).backbone == "resnet34"


def test_imagenet_without_the_cached_file_names_the_file_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(ConfigError) as error:
        build_model("unet", ModelSpec((64, 64, 3), 2, backbone="resnet50", encoder_weights="imagenet"))
    message = str(error.value)
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(tmp_path / "keras" / "models") in message
    assert not (tmp_path / "keras" / "models").exists()  # nothing was downloaded
    with pytest.raises(ConfigError, match="resnet18 is built here and has no ImageNet weights"):
        build_model("unet", ModelSpec((64, 64, 3), 2, backbone="resnet18", encoder_weights="imagenet"))
    with pytest.raises(ConfigError, match="4-channel image"):
        build_model("unet", ModelSpec((64, 64, 4), 2, backbone="resnet50", encoder_weights="imagenet"))


def test_weights_file_loads_into_a_grey_image_encoder(tmp_path: Path) -> None:
    """A weights file of the application (what `imagenet` reads from the cache) is loaded,
    and a 1-channel image is repeated into RGB by the fixed input adapter."""
    source = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(64, 64, 3))
    path = tmp_path / APPLICATIONS["mobilenetv2"].weights_file
    source.save_weights(str(path))
    model = build_model("unet", ModelSpec((64, 64, 1), 2, base_filters=4, backbone="mobilenetv2", encoder_weights=str(path)))
    encoder = model.get_layer(ENCODER)
    np.testing.assert_array_equal(encoder.get_layer("Conv1").get_weights()[0], source.get_layer("Conv1").get_weights()[0])
    kernel, bias = model.get_layer(INPUT_ADAPTER).get_weights()
    assert kernel.shape == (1, 1, 1, 3) and not model.get_layer(INPUT_ADAPTER).trainable
    np.testing.assert_allclose(kernel[0, 0, 0], 2 * np.array([0.229, 0.224, 0.225]), rtol=1e-6)  # [-1, 1] input
    np.testing.assert_allclose(bias, 2 * np.array([0.485, 0.456, 0.406]) - 1, rtol=1e-6)


def _moving_statistics(layer: keras.Model) -> list[np.ndarray]:
    return [weight.numpy().copy() for weight in layer.weights if "moving" in weight.name]


def test_frozen_encoder_keeps_batchnorm_statistics_and_weights() -> None:
    shape = (64, 64, 3)
    config = validate_config({
        "name": "x", "dataset": {"images": "i", "masks": "m"}, "shape": list(shape), "backbone": "resnet18",
        "model": {"base_filters": 4, "freeze_encoder": True}, "stages": [{"epochs": 1}, {"epochs": 1, "freeze_encoder": False}],
    })
    model = build_model("unet", ModelSpec(shape, 2, base_filters=4, backbone="resnet18"))
    encoder = model.get_layer(ENCODER)
    images, labels = _batch(shape, 2)
    images = images * 3 + 1  # far from the initial moving statistics (mean 0, variance 1)

    assert apply_stage_freeze(model, config.model, config.stages[0]) is True
    _compile(model, 2)
    statistics, weights = _moving_statistics(encoder), [w.copy() for w in encoder.get_weights()]
    decoder_before = model.get_layer("decoder1_conv1").get_weights()[0].copy()
    model.train_on_batch(images, labels)
    for old, new in zip(statistics, _moving_statistics(encoder)):
        np.testing.assert_array_equal(old, new)
    for old, new in zip(weights, encoder.get_weights()):
        np.testing.assert_array_equal(old, new)
    assert not np.array_equal(decoder_before, model.get_layer("decoder1_conv1").get_weights()[0])

    assert apply_stage_freeze(model, config.model, config.stages[1]) is False
    _compile(model, 2)
    model.train_on_batch(images, labels)
    assert any(not np.array_equal(old, new) for old, new in zip(statistics, _moving_statistics(encoder)))
    set_encoder_trainable(model, False)
    assert not encoder.trainable and all(not layer.trainable for layer in encoder.layers)


def _int8_tflite(model: keras.Model, shape: tuple[int, int, int]) -> bytes:
    """Converted as segflow/export/exporters.py does (full integer, uint8 in and out), from a concrete function."""
    function = tf.function(lambda x: tf.nn.softmax(model(x, training=False), axis=-1)).get_concrete_function(tf.TensorSpec((1, *shape), tf.float32))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    converter.representative_dataset = lambda: ([rng.normal(size=(1, *shape)).astype(np.float32)] for _ in range(4))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    return converter.convert()


@pytest.mark.parametrize("architecture", ARCHITECTURES.names())
def test_architectures_convert_to_int8_tflite_and_run(architecture: str) -> None:
    from ai_edge_litert.interpreter import Interpreter

    shape = (32, 32, 3)
    model = build_model(architecture, ModelSpec(shape, 3, base_filters=4, backbone="simple", depth=3))
    interpreter = Interpreter(model_content=_int8_tflite(model, shape))
    interpreter.allocate_tensors()
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert "TRANSPOSE_CONV" not in ops, ops
    (entry,), (exit_,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert entry["dtype"] == np.uint8 and exit_["dtype"] == np.uint8
    interpreter.set_tensor(entry["index"], np.random.default_rng(1).integers(0, 255, size=(1, *shape), dtype=np.uint8))
    interpreter.invoke()
    assert interpreter.get_tensor(exit_["index"]).shape == (1, *shape)


def test_pixel_unshuffle_and_shuffle_are_exact_inverses() -> None:
    image = np.random.default_rng(2).normal(size=(2, 8, 12, 3)).astype(np.float32)
    blocks = SpaceToDepth(2)(image)
    assert blocks.shape == (2, 4, 6, 12)
    assert np.array_equal(blocks[0, 1, 2, :3], image[0, 2, 4])  # a block's top-left pixel comes first
    np.testing.assert_array_equal(DepthToSpace(2)(blocks), image)


@pytest.mark.parametrize("architecture", ARCHITECTURES.names())
@pytest.mark.parametrize("factor", [2, 4])
def test_pixel_shuffled_networks_train_and_keep_the_input_size(architecture: str, factor: int) -> None:
    shape = (64, 64, 1)
    model = build_model(architecture, ModelSpec(shape, 3, base_filters=8, backbone="simple", depth=2, pixel_shuffle=factor))
    encoder = model.get_layer(ENCODER)
    assert encoder.input_shape == (None, 64 // factor, 64 // factor, factor**2)  # the network proper runs on pixel blocks
    images, labels = _batch(shape, 3)
    assert model(images).shape == (2, 64, 64, 3)
    _compile(model, 3)
    assert np.isfinite(model.train_on_batch(images, labels))


def test_pixel_shuffle_converts_to_int8_tflite_without_full_resolution_convolutions() -> None:
    from ai_edge_litert.interpreter import Interpreter

    shape = (32, 32, 1)
    model = build_model("unet", ModelSpec(shape, 2, base_filters=4, backbone="simple", depth=2, pixel_shuffle=2))
    interpreter = Interpreter(model_content=_int8_tflite(model, shape))
    interpreter.allocate_tensors()
    details = interpreter.get_tensor_details()
    convolution_outputs = [op["outputs"][0] for op in interpreter._get_ops_details() if op["op_name"] == "CONV_2D"]
    heights = {int(details[index]["shape"][1]) for index in convolution_outputs}
    assert heights and max(heights) == 16, heights  # every convolution at half the input size or less
    (entry,), (exit_,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.set_tensor(entry["index"], np.zeros((1, *shape), np.uint8))
    interpreter.invoke()
    assert interpreter.get_tensor(exit_["index"]).shape == (1, *shape[:2], 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"shape": [64, 64, 3], "backbone": "mobilenetv2", "model": {"encoder_weights": "imagenet", "pixel_shuffle": 2}}, "12-channel pixel blocks"),
        ({"shape": [48, 48, 1], "model": {"depth": 4, "pixel_shuffle": 2}}, "24x24 pixel blocks"),
        ({"shape": [66, 66, 1], "model": {"depth": 1, "pixel_shuffle": 4}}, "divisible by 4"),
    ],
)
def test_pixel_shuffle_contradictions_fail_at_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config({"name": "shuffle", "dataset": {"images": "i", "masks": "m"}, "classes": ["a", "b"], **overrides})
