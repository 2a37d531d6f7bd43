"""Segmentation architectures and encoders (tf_keras), registered by name.

A backbone turns an input tensor into a pyramid of features (finest first); an
architecture decodes that pyramid into per-pixel logits. The head is linear:
losses, metrics and exports apply softmax/sigmoid themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import tf_keras as keras

from segflow.registry import ARCHITECTURES, BACKBONES


@dataclass(frozen=True)
class ModelSpec:
    shape: tuple[int, int, int]
    output_channels: int  # 1 for a sigmoid head, number of classes for softmax
    depth: int = 4
    base_filters: int = 32
    dropout: float = 0.0
    backbone: str = "simple"


def conv_block(x: keras.layers.Layer, filters: int, name: str) -> keras.layers.Layer:
    for index in (1, 2):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{index}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{index}")(x)
        x = keras.layers.ReLU(name=f"{name}_relu{index}")(x)
    return x


@BACKBONES.register("simple")
def simple_encoder(inputs: keras.layers.Layer, spec: ModelSpec) -> list[keras.layers.Layer]:
    """From-scratch VGG-style encoder: two conv-BN-ReLU per level, max-pool between levels."""
    features = []
    x = inputs
    for level in range(spec.depth + 1):
        if level:
            x = keras.layers.MaxPooling2D(name=f"encoder{level}_pool")(x)
        x = conv_block(x, spec.base_filters * 2**level, f"encoder{level}")
        features.append(x)
    return features


@ARCHITECTURES.register("unet")
def unet(spec: ModelSpec) -> keras.Model:
    """U-Net (Ronneberger et al. 2015): transposed-conv decoder with skip connections."""
    height, width, _ = spec.shape
    factor = 2**spec.depth
    if height % factor or width % factor:
        raise ValueError(f"unet with depth {spec.depth} needs height and width divisible by {factor}; got {height}x{width}")
    inputs = keras.Input(shape=spec.shape, name="image")
    features = BACKBONES.get(spec.backbone)(inputs, spec)
    x = features[-1]
    if spec.dropout:
        x = keras.layers.Dropout(spec.dropout, name="bottleneck_dropout")(x)
    for level in range(len(features) - 2, -1, -1):
        skip = features[level]
        filters = skip.shape[-1]
        x = keras.layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"decoder{level}_up")(x)
        x = keras.layers.Concatenate(name=f"decoder{level}_concat")([x, skip])
        x = conv_block(x, filters, f"decoder{level}")
    logits = keras.layers.Conv2D(spec.output_channels, 1, name="logits")(x)
    return keras.Model(inputs, logits, name=f"unet_{spec.backbone}")


def build_model(architecture: str, spec: ModelSpec) -> keras.Model:
    return ARCHITECTURES.get(architecture)(spec)
