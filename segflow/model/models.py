"""Segmentation architectures and encoders (tf_keras), registered by name.

A backbone turns the input image into a feature pyramid: one feature map per level,
finest first, level l at about 1/2**l of the input size (the from-scratch `simple`
encoder starts at level 0, every other backbone at level 1, down to level 5). An
architecture decodes any backbone's pyramid into per-pixel logits at the input size:
K channels (softmax) or 1 (sigmoid). The head is linear: losses, metrics and exports
apply softmax/sigmoid themselves.

The encoder is one nested model named `encoder` (ENCODER), so freezing it is one flag
(`set_encoder_trainable`). Decoders upsample by bilinear resizing, never by transposed
convolutions (slow under TFLite quantization, issue 7), and use only ops that LiteRT
runs in int8.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import tensorflow as tf
import tf_keras as keras

from segflow.utils.errors import ConfigError
from segflow.utils.registry import ARCHITECTURES, BACKBONES

if TYPE_CHECKING:
    from segflow.config.experiment import ModelConfig, StageConfig

ENCODER = "encoder"  # the nested encoder model's name in every network
INPUT_ADAPTER = "input_adapter"  # fixed layer mapping the normalised image to a pretrained encoder's input
IMAGENET = "imagenet"
Tensor = Any  # a symbolic Keras tensor


@dataclass(frozen=True)
class ModelSpec:
    shape: tuple[int, int, int]
    output_channels: int  # 1 for a sigmoid head, number of classes for softmax
    depth: int | None = None  # pyramid levels used (total stride 2**depth); None: the backbone's default
    base_filters: int = 32  # decoder width at level 0; doubled per level
    dropout: float = 0.0
    backbone: str = "simple"
    encoder_weights: str | None = None  # None (random), "imagenet" or a weights file
    pixel_shuffle: int = 1  # the network runs at 1/pixel_shuffle of the input size (space-to-depth in, depth-to-space out)


@dataclass(frozen=True)
class Backbone:
    """A registered encoder: `build(inputs, spec, depth)` returns its pyramid, finest first,
    starting at `first_level`. The input to `build` is the adapted image (`adapter`)."""

    name: str
    build: Callable[[Tensor, ModelSpec, int], list[Tensor]]
    description: str
    first_level: int = 1
    max_depth: int = 5
    default_depth: int = 5
    min_size: int = 32  # smallest height/width its valid-padded stem accepts
    pretrained: bool = False  # whether `imagenet` weights exist for it

    def depth(self, spec: ModelSpec) -> int:
        return self.default_depth if spec.depth is None else spec.depth


@dataclass(frozen=True)
class Architecture:
    """A registered decoder: `decode(pyramid, levels, spec)` returns logits at the input size.
    `max_level` caps the encoder (PSPNet reads the stride-8 features only)."""

    name: str
    decode: Callable[[list[Tensor], list[int], ModelSpec], Tensor]
    description: str
    max_level: int | None = None


def backbone(name: str, **options: Any) -> Callable[[Callable[..., list[Tensor]]], Callable[..., list[Tensor]]]:
    """Decorator: register an encoder-building function under `name`."""

    def decorate(build: Callable[..., list[Tensor]]) -> Callable[..., list[Tensor]]:
        BACKBONES.add(name, Backbone(name, build, (build.__doc__ or "").strip().splitlines()[0], **options))
        return build

    return decorate


def architecture(name: str, max_level: int | None = None) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator: register a decoder function under `name`."""

    def decorate(decode: Callable[..., Tensor]) -> Callable[..., Tensor]:
        ARCHITECTURES.add(name, Architecture(name, decode, (decode.__doc__ or "").strip().splitlines()[0], max_level))
        return decode

    return decorate


# ---------------------------------------------------------------- building blocks


def conv_bn_relu(x: Tensor, filters: int, name: str, kernel: int = 3, dilation: int = 1, separable: bool = False) -> Tensor:
    conv = keras.layers.SeparableConv2D if separable else keras.layers.Conv2D
    x = conv(filters, kernel, padding="same", dilation_rate=dilation, use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def conv_block(x: Tensor, filters: int, name: str) -> Tensor:
    """Two conv-BN-ReLU: the U-Net unit."""
    for index in (1, 2):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{index}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{index}")(x)
        x = keras.layers.ReLU(name=f"{name}_relu{index}")(x)
    return x


def resize_to(x: Tensor, size: tuple[int, int], name: str, interpolation: str = "bilinear") -> Tensor:
    """Resize to an exact (height, width): UpSampling2D for whole factors, Resizing otherwise
    (valid-padded encoders such as Inception give odd sizes). Both are LiteRT RESIZE ops."""
    height, width = int(x.shape[1]), int(x.shape[2])
    if (height, width) == tuple(size):
        return x
    if size[0] % height == 0 and size[1] % width == 0:
        return keras.layers.UpSampling2D((size[0] // height, size[1] // width), interpolation=interpolation, name=name)(x)
    return keras.layers.Resizing(size[0], size[1], interpolation=interpolation, name=name)(x)


def _size(x: Tensor) -> tuple[int, int]:
    return int(x.shape[1]), int(x.shape[2])


def _width(spec: ModelSpec, level: int) -> int:
    """Decoder filters at a level: base_filters doubled per level, as the simple encoder's."""
    return spec.base_filters * 2**level


def _logits(x: Tensor, spec: ModelSpec) -> Tensor:
    """The linear head, resized bilinearly to the input size when x is coarser."""
    logits = keras.layers.Conv2D(spec.output_channels, 1, name="logits")(x)
    return resize_to(logits, spec.shape[:2], "logits_resize")


# ---------------------------------------------------------------- built-in encoders


@backbone("simple", first_level=0, max_depth=6, default_depth=4, min_size=16)
def simple_encoder(inputs: Tensor, spec: ModelSpec, depth: int) -> list[Tensor]:
    """From-scratch VGG-style encoder: two conv-BN-ReLU per level, max-pool between levels."""
    features = []
    x = inputs
    for level in range(depth + 1):
        if level:
            x = keras.layers.MaxPooling2D(name=f"encoder{level}_pool")(x)
        x = conv_block(x, spec.base_filters * 2**level, f"encoder{level}")
        features.append(x)
    return features


def _basic_block(x: Tensor, filters: int, stride: int, name: str) -> Tensor:
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj_conv")(x)
        shortcut = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_proj_bn")(shortcut)
    x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn1")(x)
    x = keras.layers.ReLU(name=f"{name}_relu1")(x)
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn2")(x)
    x = keras.layers.Add(name=f"{name}_add")([x, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(x)


def _resnet(blocks: tuple[int, int, int, int]) -> Callable[[Tensor, ModelSpec, int], list[Tensor]]:
    def build(inputs: Tensor, spec: ModelSpec, depth: int) -> list[Tensor]:
        x = keras.layers.Conv2D(64, 7, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
        x = keras.layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
        x = keras.layers.ReLU(name="stem_relu")(x)
        features = [x]
        for stage, (count, filters) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
            if stage + 1 > depth:
                break
            if stage == 1:
                x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
            for index in range(count):
                x = _basic_block(x, filters, 2 if index == 0 and stage > 1 else 1, f"stage{stage}_block{index + 1}")
            features.append(x)
        return features

    return build


for _name, _blocks in (("resnet18", (2, 2, 2, 2)), ("resnet34", (3, 4, 6, 3))):
    _build = _resnet(_blocks)
    _build.__doc__ = f"{_name.capitalize()} (He et al. 2016, BasicBlock {'-'.join(map(str, _blocks))}), built here; random initialisation"
    backbone(_name)(_build)


# ---------------------------------------------------------------- tf_keras.applications encoders

# Each family's input convention for pretrained weights, given the image normalised per
# channel (TFT): assumed close to ImageNet-standardised RGB, it is mapped back to what the
# weights were trained on. `tf`: [-1, 1]; `caffe`: BGR 0..255 minus the mean; `torch`: the
# standardised image itself; `efficientnet`: 0..255 (the model rescales and normalises inside).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class Application:
    """A keras.applications encoder: the layers that are its pyramid (levels 1..5) and its
    ImageNet file. A tap is a layer name, `input of NAME` (the tensor entering that layer),
    a layer index (Inception's stem layers have counter-numbered names) or `output`."""

    constructor: str
    taps: tuple[str | int, str | int, str | int, str | int, str | int]
    preprocessing: str
    weights_file: str
    weights_url: str
    options: dict[str, Any] = field(default_factory=dict)
    min_size: int = 32


def _resnet_taps(blocks: tuple[int, int, int], v2: bool) -> tuple[str, str, str, str, str]:
    if v2:  # pre-activation: the strided block is each stage's last; tap its pre-activation
        return ("conv1_conv", f"conv2_block{blocks[0]}_preact_relu", f"conv3_block{blocks[1]}_preact_relu", f"conv4_block{blocks[2]}_preact_relu", "post_relu")
    return ("conv1_relu", f"conv2_block{blocks[0]}_out", f"conv3_block{blocks[1]}_out", f"conv4_block{blocks[2]}_out", "conv5_block3_out")


def _applications() -> dict[str, Application]:
    table = {
        "vgg16": Application("VGG16", ("block2_conv2", "block3_conv3", "block4_conv3", "block5_conv3", "block5_pool"), "caffe",
                             "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", KERAS_WEIGHTS + "vgg16/"),
        "vgg19": Application("VGG19", ("block2_conv2", "block3_conv4", "block4_conv4", "block5_conv4", "block5_pool"), "caffe",
                             "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", KERAS_WEIGHTS + "vgg19/"),
        "mobilenetv2": Application("MobileNetV2", ("block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu", "block_13_expand_relu", "out_relu"), "tf",
                                   "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", KERAS_WEIGHTS + "mobilenet_v2/"),
        "mobilenetv3small": Application(
            "MobileNetV3Small",
            ("input of expanded_conv/depthwise/pad", "input of expanded_conv_1/depthwise/pad", "input of expanded_conv_3/depthwise/pad", "input of expanded_conv_8/depthwise/pad", "output"),
            "tf", "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5", KERAS_WEIGHTS + "mobilenet_v3/", {"include_preprocessing": False}),
        "mobilenetv3large": Application(
            "MobileNetV3Large",
            ("input of expanded_conv_1/depthwise/pad", "input of expanded_conv_3/depthwise/pad", "input of expanded_conv_6/depthwise/pad", "input of expanded_conv_12/depthwise/pad", "output"),
            "tf", "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", KERAS_WEIGHTS + "mobilenet_v3/", {"include_preprocessing": False}),
        "xception": Application("Xception", ("block1_conv2_act", "block3_sepconv1_act", "block4_sepconv1_act", "block13_sepconv1_act", "block14_sepconv2_act"), "tf",
                                "xception_weights_tf_dim_ordering_tf_kernels_notop.h5", KERAS_WEIGHTS + "xception/"),
        # Valid-padded stems: the pyramid's sizes are not exact halvings; decoders resize to each.
        "inceptionv3": Application("InceptionV3", (9, 16, "mixed2", "mixed7", "mixed10"), "tf",
                                   "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", KERAS_WEIGHTS + "inception_v3/", min_size=75),
        "inceptionresnetv2": Application("InceptionResNetV2", (9, 16, "block35_10_ac", "block17_20_ac", "conv_7b_ac"), "tf",
                                         "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5", KERAS_WEIGHTS + "inception_resnet_v2/", min_size=75),
    }
    for depth, blocks in ((50, (3, 4, 6)), (101, (3, 4, 23)), (152, (3, 8, 36))):
        for v2 in (False, True):
            name = f"resnet{depth}{'v2' if v2 else ''}"
            table[name] = Application(f"ResNet{depth}{'V2' if v2 else ''}", _resnet_taps(blocks, v2), "tf" if v2 else "caffe",
                                      f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5", KERAS_WEIGHTS + "resnet/")
    for depth in (121, 169, 201):
        table[f"densenet{depth}"] = Application(f"DenseNet{depth}", ("conv1/relu", "pool2_conv", "pool3_conv", "pool4_conv", "relu"), "torch",
                                                f"densenet{depth}_weights_tf_dim_ordering_tf_kernels_notop.h5", KERAS_WEIGHTS + "densenet/")
    for variant in range(8):
        table[f"efficientnetb{variant}"] = Application(
            f"EfficientNetB{variant}",
            ("block2a_expand_activation", "block3a_expand_activation", "block4a_expand_activation", "block6a_expand_activation", "top_activation"),
            "efficientnet", f"efficientnetb{variant}_notop.h5", "https://storage.googleapis.com/keras-applications/")
    for variant in ("B0", "B1", "B2", "B3", "S", "M", "L"):
        table[f"efficientnetv2{variant.lower()}"] = Application(
            f"EfficientNetV2{variant}",
            ("input of block2a_expand_conv", "input of block3a_expand_conv", "block4a_expand_activation", "block6a_expand_activation", "top_activation"),
            # without its own preprocessing a B variant wants the standardised image, S/M/L [-1, 1]
            "torch" if variant.startswith("B") else "tf", f"efficientnetv2-{variant.lower()}_notop.h5", KERAS_WEIGHTS + "efficientnet_v2/",
            {"include_preprocessing": False})
    return table


APPLICATIONS: dict[str, Application] = _applications()


def keras_cache_dir() -> Path:
    """Where tf_keras keeps downloaded weights (KERAS_HOME, else ~/.keras), `models/` inside."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"


def weights_file(name: str, encoder_weights: str) -> Path:
    """The file `encoder_weights` names for backbone `name`; never downloads anything."""
    if encoder_weights != IMAGENET:
        path = Path(encoder_weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.encoder_weights: {encoder_weights} is not a file (backbone {name})")
        return path
    if name not in APPLICATIONS:
        raise ConfigError(
            f"model.encoder_weights: imagenet: backbone {name} is built here and has no ImageNet weights; "
            "use null (random initialisation) or the path of weights saved from its encoder"
        )
    application = APPLICATIONS[name]
    path = keras_cache_dir() / application.weights_file
    if not path.is_file():
        raise ConfigError(
            f"model.encoder_weights: imagenet for backbone {name} needs the file {application.weights_file} in {path.parent}/ "
            f"(nothing is downloaded at run time). Fetch it where there is network access ({application.weights_url}{application.weights_file}) "
            "and copy it into that folder, or set model.encoder_weights to its path"
        )
    return path


def _tap(model: keras.Model, tap: str | int) -> Tensor:
    if isinstance(tap, int):
        return model.layers[tap].output
    if tap == "output":
        return model.output
    if tap.startswith("input of "):
        return model.get_layer(tap.removeprefix("input of ")).input
    return model.get_layer(tap).output


def _adapter(application: Application, channels: int, pretrained: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """(kernel [channels, 3], bias [3]) of the fixed 1x1 convolution that turns the normalised
    image into the input the weights were trained on; a 1-channel image is repeated into RGB.
    None when the image goes in as it is (random initialisation, any channel count)."""
    if not pretrained:
        if application.preprocessing == "efficientnet":  # its stem divides by 255 inside
            return np.eye(channels, dtype=np.float32) * 255.0, np.zeros(channels, np.float32)
        return None
    if application.preprocessing == "torch":
        matrix, bias = np.eye(3, dtype=np.float32), np.zeros(3, np.float32)
    elif application.preprocessing == "efficientnet":
        matrix, bias = np.eye(3, dtype=np.float32) * 255.0, np.zeros(3, np.float32)
    elif application.preprocessing == "tf":
        matrix, bias = np.diag(2.0 * IMAGENET_STD), 2.0 * IMAGENET_MEAN - 1.0
    else:  # caffe: BGR order, 0..255, mean subtracted
        matrix = np.zeros((3, 3), np.float32)
        for rgb in range(3):
            matrix[rgb, 2 - rgb] = 255.0 * IMAGENET_STD[rgb]
        bias = 255.0 * IMAGENET_MEAN[::-1] - CAFFE_MEAN_BGR
    if channels == 1:
        matrix = matrix.sum(axis=0, keepdims=True)  # the grey channel stands for R, G and B
    return matrix.astype(np.float32), bias.astype(np.float32)


def _application_encoder(name: str, application: Application) -> Callable[[Tensor, ModelSpec, int], list[Tensor]]:
    def build(inputs: Tensor, spec: ModelSpec, depth: int) -> list[Tensor]:
        constructor = getattr(keras.applications, application.constructor)
        # input_tensor (not input_shape): no 3-channel or minimum-size check for weights=None,
        # and weights are loaded by this module, never by tf_keras (which would download them).
        model = constructor(include_top=False, weights=None, input_tensor=inputs, **application.options)
        if spec.encoder_weights is not None:
            path = weights_file(name, spec.encoder_weights)
            try:
                model.load_weights(str(path))
            except (ValueError, OSError) as error:
                raise ConfigError(f"model.encoder_weights: {path} does not fit backbone {name} ({application.constructor}): {error}") from None
            if application.preprocessing == "efficientnet":
                # The file's Normalization layer holds ImageNet statistics; the adapter already
                # gives standardised input, so make that layer the identity.
                norm = next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))
                mean, variance, count = norm.get_weights()
                norm.set_weights([np.zeros_like(mean), np.ones_like(variance), count])
        return [_tap(model, tap) for tap in application.taps[:depth]]

    return build


for _name, _application in APPLICATIONS.items():
    BACKBONES.add(
        _name,
        Backbone(
            _name,
            _application_encoder(_name, _application),
            f"tf_keras.applications.{_application.constructor}; encoder_weights imagenet reads {_application.weights_file}",
            min_size=_application.min_size,
            pretrained=True,
        ),
    )


# ---------------------------------------------------------------- the encoder and its checks


def encoder_depth(architecture_name: str, spec: ModelSpec) -> int:
    """Pyramid levels the network uses: the spec's depth (or the backbone's default), capped
    by the architecture. Raises ConfigError for a depth the backbone does not have."""
    entry: Backbone = BACKBONES.get(spec.backbone)
    depth = entry.depth(spec)
    if not entry.first_level <= depth <= entry.max_depth:
        raise ConfigError(
            f"model.depth {depth}: backbone {spec.backbone} has levels {entry.first_level}..{entry.max_depth} "
            f"(total stride up to {2**entry.max_depth})"
        )
    cap = ARCHITECTURES.get(architecture_name).max_level
    return depth if cap is None else min(depth, cap)


def _shuffled(spec: ModelSpec) -> ModelSpec:
    """The spec of the network inside a pixel shuffle: the input's factor x factor pixel blocks
    become channels, and every output pixel gets its own channels of the logits."""
    factor = spec.pixel_shuffle
    height, width, channels = spec.shape
    return replace(
        spec,
        shape=(height // factor, width // factor, channels * factor**2),
        output_channels=spec.output_channels * factor**2,
        pixel_shuffle=1,
    )


def check_spec(architecture_name: str, spec: ModelSpec) -> None:
    """Every shape and weights contradiction, without building anything: the config
    validator calls this so that a bad combination fails before any work starts."""
    height, width, channels = spec.shape
    shape = "x".join(map(str, spec.shape))
    if channels not in (1, 3, 4):
        raise ConfigError(f"shape {shape}: the model takes 1, 3 or 4 channels")
    factor = spec.pixel_shuffle
    if factor == 1:
        _check_network(architecture_name, spec)
        return
    if spec.encoder_weights is not None:
        raise ConfigError(
            f"model.pixel_shuffle {factor}: the encoder sees {channels * factor**2}-channel pixel blocks, which "
            f"{spec.encoder_weights} weights were not trained on; use encoder_weights null or pixel_shuffle 1"
        )
    if height % factor or width % factor:
        raise ConfigError(f"shape {shape}: model.pixel_shuffle {factor} needs height and width divisible by {factor}")
    try:
        _check_network(architecture_name, _shuffled(spec))
    except ConfigError as error:
        raise ConfigError(f"model.pixel_shuffle {factor} runs the network on {height // factor}x{width // factor} pixel blocks: {error}") from None


def _check_network(architecture_name: str, spec: ModelSpec) -> None:
    """The stride, size and weights checks of the network proper (inside any pixel shuffle)."""
    entry: Backbone = BACKBONES.get(spec.backbone)
    height, width, channels = spec.shape
    depth = encoder_depth(architecture_name, spec)
    multiple = 2**depth
    shape = "x".join(map(str, spec.shape))
    if height % multiple or width % multiple:
        raise ConfigError(
            f"shape {shape}: {architecture_name} on backbone {spec.backbone} (depth {depth}) needs height and width "
            f"divisible by {multiple}, its total stride; e.g. {math.ceil(height / multiple) * multiple}x{math.ceil(width / multiple) * multiple}"
        )
    if min(height, width) < entry.min_size:
        smallest = math.ceil(entry.min_size / multiple) * multiple
        raise ConfigError(f"shape {shape}: backbone {spec.backbone} needs height and width of at least {entry.min_size} ({smallest} with its stride {multiple})")
    if spec.encoder_weights is not None and entry.pretrained and channels == 4:
        raise ConfigError(
            f"shape {shape}: {spec.backbone}'s {spec.encoder_weights} weights were trained on RGB; a 4-channel image has no such "
            "mapping. Use 3 channels (or 1: it is repeated into R, G and B), or encoder_weights null"
        )
    if spec.encoder_weights == IMAGENET and not entry.pretrained:
        weights_file(spec.backbone, IMAGENET)  # raises, naming the alternatives


def build_encoder(architecture_name: str, spec: ModelSpec) -> keras.Model:
    """The backbone as one nested model named ENCODER: its input is the (adapted) image,
    its outputs the pyramid levels the architecture uses, finest first."""
    entry: Backbone = BACKBONES.get(spec.backbone)
    depth = encoder_depth(architecture_name, spec)
    application = APPLICATIONS.get(spec.backbone)
    channels = 3 if application is not None and spec.encoder_weights is not None else spec.shape[2]  # pretrained: adapted to RGB
    inputs = keras.Input(shape=(*spec.shape[:2], channels), name=f"{ENCODER}_input")
    features = entry.build(inputs, spec, depth)
    return keras.Model(inputs, features, name=ENCODER)


class PixelRearrange(keras.layers.Layer):
    """A layer that moves pixels between positions and channels by a whole `factor`."""

    def __init__(self, factor: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor = factor

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "factor": self.factor}


class SpaceToDepth(PixelRearrange):
    """Each factor x factor block of pixels becomes one pixel with factor**2 times the channels."""

    def call(self, inputs: Tensor) -> Tensor:
        return tf.nn.space_to_depth(inputs, self.factor)


class DepthToSpace(PixelRearrange):
    """The inverse of SpaceToDepth: channel groups become a factor x factor block of pixels."""

    def call(self, inputs: Tensor) -> Tensor:
        return tf.nn.depth_to_space(inputs, self.factor)


def build_model(architecture_name: str, spec: ModelSpec, nested_encoder: bool = True) -> keras.Model:
    """Input image -> [pixel unshuffle] -> [fixed input adapter] -> encoder pyramid -> decoder
    -> logits [-> pixel shuffle].

    With `pixel_shuffle` f > 1 the whole network runs at 1/f of the input size on f*f pixel
    blocks and no pixel is lost on the way in or out. Full-resolution layers move large
    tensors for little arithmetic, where int8 gains almost nothing on a mobile CPU
    (benchmarks/README.md): this is what lets an int8 export run at a quarter of fp32's time.

    `nested_encoder=False` builds the encoder's layers inline (same names, so weights copy
    by name): tensorflow-model-optimization cannot quantize a model inside a model."""
    check_spec(architecture_name, spec)
    inputs = keras.Input(shape=spec.shape, name="image")
    if spec.pixel_shuffle == 1:
        logits = _network(architecture_name, spec, inputs, nested_encoder)
    else:
        blocks = SpaceToDepth(spec.pixel_shuffle, name="pixel_unshuffle")(inputs)
        logits = DepthToSpace(spec.pixel_shuffle, name="pixel_shuffle")(_network(architecture_name, _shuffled(spec), blocks, nested_encoder))
    if keras.mixed_precision.global_policy().compute_dtype != "float32":
        # Mixed precision: float32 logits, so softmax, losses and metrics do not run in float16.
        logits = keras.layers.Activation("linear", dtype="float32", name="logits_float32")(logits)
    return keras.Model(inputs, logits, name=f"{architecture_name}_{spec.backbone}")


def builtin_backbones() -> list[str]:
    """Backbones built from segflow's own layers (not a tf_keras.applications model)."""
    return [name for name in BACKBONES.names() if name not in APPLICATIONS]


def _network(architecture_name: str, spec: ModelSpec, inputs: Tensor, nested_encoder: bool) -> Tensor:
    """The logits of `spec`'s network on `inputs`."""
    entry: Backbone = BACKBONES.get(spec.backbone)
    features = _encoded(architecture_name, spec, inputs) if nested_encoder else _encoded_inline(architecture_name, spec, inputs)
    levels = list(range(entry.first_level, entry.first_level + len(features)))
    return ARCHITECTURES.get(architecture_name).decode(features, levels, spec)


def _encoded(architecture_name: str, spec: ModelSpec, inputs: Tensor) -> list[Tensor]:
    """The pyramid through [the fixed input adapter and] the nested ENCODER model."""
    x = inputs
    application = APPLICATIONS.get(spec.backbone)
    adapter = _adapter(application, spec.shape[2], spec.encoder_weights is not None) if application is not None else None
    if adapter is not None:
        kernel, bias = adapter
        layer = keras.layers.Conv2D(kernel.shape[1], 1, name=INPUT_ADAPTER, trainable=False)
        x = layer(x)
        layer.set_weights([kernel[None, None], bias])
    features = build_encoder(architecture_name, spec)(x)
    return features if isinstance(features, list) else [features]


def _encoded_inline(architecture_name: str, spec: ModelSpec, inputs: Tensor) -> list[Tensor]:
    """The pyramid with the encoder's layers in the outer model (same layer names)."""
    if spec.backbone in APPLICATIONS:
        raise ConfigError(
            f"backbone {spec.backbone}: a tf_keras.applications encoder is a model of its own and cannot be built inline "
            f"(as quantization-aware training needs); use a built-in backbone: {', '.join(builtin_backbones())}"
        )
    return BACKBONES.get(spec.backbone).build(inputs, spec, encoder_depth(architecture_name, spec))


def model_spec(shape: list[int], output_channels: int, backbone: str, model: ModelConfig) -> ModelSpec:
    """The network of an experiment's `shape`, head, `backbone` and `model` section (one
    place for the trainer and the config validator)."""
    return ModelSpec(
        shape=(shape[0], shape[1], shape[2]),
        output_channels=output_channels,
        depth=model.depth,
        base_filters=model.base_filters,
        dropout=model.dropout,
        backbone=backbone,
        encoder_weights=model.encoder_weights,
        pixel_shuffle=model.pixel_shuffle,
    )


def set_encoder_trainable(model: keras.Model, trainable: bool) -> None:
    """Freeze or unfreeze the encoder. A frozen encoder's BatchNorm layers run in inference
    mode (tf_keras does that for trainable=False), so fine-tuning a decoder on small batches
    never moves pretrained moving statistics. Recompile after calling this."""
    model.get_layer(ENCODER).trainable = trainable


def apply_stage_freeze(model: keras.Model, model_config: ModelConfig, stage: StageConfig) -> bool:
    """Set the encoder's trainability for a training stage (the stage's freeze_encoder, else
    model.freeze_encoder); returns whether it is frozen. Call before compiling the stage."""
    frozen = model_config.freeze_encoder if stage.freeze_encoder is None else stage.freeze_encoder
    set_encoder_trainable(model, not frozen)
    return frozen


# ---------------------------------------------------------------- architectures


@architecture("unet")
def unet(features: list[Tensor], levels: list[int], spec: ModelSpec) -> Tensor:
    """U-Net (Ronneberger et al. 2015): bilinear upsampling, concatenated skips, two convs per level."""
    x = features[-1]
    if spec.dropout:
        x = keras.layers.Dropout(spec.dropout, name="bottleneck_dropout")(x)
    for skip, level in zip(features[-2::-1], levels[-2::-1]):
        x = resize_to(x, _size(skip), f"decoder{level}_up")
        x = keras.layers.Concatenate(name=f"decoder{level}_concat")([x, skip])
        x = conv_block(x, _width(spec, level), f"decoder{level}")
    if levels[0] > 0:  # the encoder's finest level is coarser than the input
        x = resize_to(x, spec.shape[:2], "decoder0_up")
        x = conv_block(x, spec.base_filters, "decoder0")
    return keras.layers.Conv2D(spec.output_channels, 1, name="logits")(x)


@architecture("linknet")
def linknet(features: list[Tensor], levels: list[int], spec: ModelSpec) -> Tensor:
    """LinkNet (Chaurasia & Culurciello 2017): light decoder blocks whose output is added to the skip."""
    x = features[-1]
    if spec.dropout:
        x = keras.layers.Dropout(spec.dropout, name="bottleneck_dropout")(x)
    for skip, level in zip(features[-2::-1], levels[-2::-1]):
        squeeze = max(int(x.shape[-1]) // 4, 8)
        x = conv_bn_relu(x, squeeze, f"decoder{level}_reduce", kernel=1)
        x = resize_to(x, _size(skip), f"decoder{level}_up")
        x = conv_bn_relu(x, squeeze, f"decoder{level}_mix")
        x = conv_bn_relu(x, int(skip.shape[-1]), f"decoder{level}_expand", kernel=1)
        x = keras.layers.Add(name=f"decoder{level}_add")([x, skip])
    if levels[0] > 0:
        x = resize_to(x, spec.shape[:2], "decoder0_up")
        x = conv_bn_relu(x, spec.base_filters, "decoder0_mix")
    return keras.layers.Conv2D(spec.output_channels, 1, name="logits")(x)


@architecture("fpn")
def fpn(features: list[Tensor], levels: list[int], spec: ModelSpec) -> Tensor:
    """FPN (Kirillov et al. 2019, panoptic FPN's semantic branch): top-down pyramid, summed per-level heads."""
    used = list(zip(features, levels))[-4:]
    pyramid_filters, head_filters = spec.base_filters * 8, spec.base_filters * 4
    top, top_level = used[-1]
    p = keras.layers.Conv2D(pyramid_filters, 1, name=f"fpn{top_level}_lateral")(top)
    merged = [(p, top_level)]
    for feature, level in reversed(used[:-1]):
        lateral = keras.layers.Conv2D(pyramid_filters, 1, name=f"fpn{level}_lateral")(feature)
        p = keras.layers.Add(name=f"fpn{level}_add")([resize_to(p, _size(feature), f"fpn{level}_up", "nearest"), lateral])
        merged.append((p, level))
    finest = _size(merged[-1][0])
    heads = []
    for p, level in merged:
        x = conv_bn_relu(p, head_filters, f"head{level}_a")
        x = conv_bn_relu(x, head_filters, f"head{level}_b")
        heads.append(resize_to(x, finest, f"head{level}_up"))
    x = keras.layers.Add(name="heads_add")(heads) if len(heads) > 1 else heads[0]
    if spec.dropout:
        x = keras.layers.SpatialDropout2D(spec.dropout, name="heads_dropout")(x)
    x = conv_bn_relu(x, head_filters, "heads_mix")
    return _logits(x, spec)


def _pyramid_bins(height: int, width: int) -> list[int]:
    """PSPNet's bins (1, 2, 3, 6) when they all divide the map, else the powers of two up to 8 that do."""
    standard = [b for b in (1, 2, 3, 6) if height % b == 0 and width % b == 0]
    return standard if len(standard) == 4 else [b for b in (1, 2, 4, 8) if height % b == 0 and width % b == 0]


@architecture("pspnet", max_level=3)
def pspnet(features: list[Tensor], levels: list[int], spec: ModelSpec) -> Tensor:
    """PSPNet (Zhao et al. 2017): pyramid pooling on the stride-8 features, logits resized to the input."""
    x = features[-1]
    height, width = _size(x)
    branches = [x]
    for bins in _pyramid_bins(height, width):
        pooled = keras.layers.AveragePooling2D((height // bins, width // bins), name=f"psp{bins}_pool")(x)
        pooled = conv_bn_relu(pooled, spec.base_filters * 4, f"psp{bins}", kernel=1)
        branches.append(resize_to(pooled, (height, width), f"psp{bins}_up"))
    x = keras.layers.Concatenate(name="psp_concat")(branches)
    x = conv_bn_relu(x, spec.base_filters * 8, "psp_mix")
    if spec.dropout:
        x = keras.layers.SpatialDropout2D(spec.dropout, name="psp_dropout")(x)
    return _logits(x, spec)


@architecture("deeplabv3plus")
def deeplabv3plus(features: list[Tensor], levels: list[int], spec: ModelSpec) -> Tensor:
    """DeepLabV3+ (Chen et al. 2018): ASPP on the coarsest features, refined with the stride-4 features."""
    x, level = features[-1], levels[-1]
    height, width = _size(x)
    filters = spec.base_filters * 8
    scale = 16 / 2**level  # the paper's rates (6, 12, 18) are for stride 16
    branches = [conv_bn_relu(x, filters, "aspp0", kernel=1)]
    for rate in (6, 12, 18):
        dilation = max(1, round(rate * scale))
        branches.append(conv_bn_relu(x, filters, f"aspp{rate}", dilation=dilation, separable=True))
    pooled = keras.layers.GlobalAveragePooling2D(keepdims=True, name="aspp_pool")(x)
    pooled = keras.layers.Conv2D(filters, 1, activation="relu", name="aspp_pool_conv")(pooled)  # no BN on a 1x1 map
    branches.append(resize_to(pooled, (height, width), "aspp_pool_up", "nearest"))
    x = keras.layers.Concatenate(name="aspp_concat")(branches)
    x = conv_bn_relu(x, filters, "aspp_project", kernel=1)
    if spec.dropout:
        x = keras.layers.Dropout(spec.dropout, name="aspp_dropout")(x)
    low_index = levels.index(2) if 2 in levels else 0
    low = features[low_index]
    if low_index < len(features) - 1:
        low = conv_bn_relu(low, max(spec.base_filters * 3 // 2, 8), "low_project", kernel=1)
        x = resize_to(x, _size(low), "aspp_up")
        x = keras.layers.Concatenate(name="decoder_concat")([x, low])
    x = conv_bn_relu(x, filters, "decoder_a", separable=True)
    x = conv_bn_relu(x, filters, "decoder_b", separable=True)
    return _logits(x, spec)
