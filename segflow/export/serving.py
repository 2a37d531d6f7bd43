"""The served model: preprocessing + TFT normalisation + network + resizing in one SavedModel.

Signatures (all take raw pixel counts, as stored in the image files; see segflow.data.preprocessing):
- `serving_default`: images [B,H,W,C] of the training data's dtype (uint8, or uint16 for
  16-bit data), any size, 1/3/4 channels -> `mask` [B,H,W] uint8 and `probabilities`
  [B,H,W,K] at the input size. `serving_uint8` and `serving_uint16` take the other dtype.
  The image reaches the model as it did in training (`patches.resize`): resized to the
  model size, fitted with padding, or at full resolution in blended tiles
  (`preprocessing.image_probabilities`).
- `fixed_size`: float32 raw counts at the model size [B,h,w,c] (what
  `preprocessing.model_pixels` makes) -> probabilities at the model size. The TFLite
  exports are converted from it, since mobile runtimes want static shapes.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from segflow.data.preprocessing import PixelSpec, image_probabilities, scale_pixels
from segflow.utils.io import read_json, write_json

SERVING_SUBDIR = "Format-Serving"
QAT_SERVING_SUBDIR = "Format-Serving-QAT"  # the quantization-aware network's served model (segflow.model.qat), beside the float one
SPEC_FILE = "serving_spec.json"
DTYPES = {"uint8": tf.uint8, "uint16": tf.uint16}

FixedSizePredictor = Callable[[np.ndarray], np.ndarray]  # [B,h,w,c] raw counts -> probabilities
MaskPredictor = Callable[[np.ndarray], np.ndarray]  # raw HxWxC image -> HxW class ids


@dataclass(frozen=True)
class ServingSpec:
    """What a client needs to know about a served model, saved beside it."""

    shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    sigmoid: bool
    ignore_index: int | None
    input_dtype: str
    value_max: float
    resize: str = "resize"  # patches.resize of the training: how an image reaches the model
    interpolation: str = "bilinear"

    @property
    def pixels(self) -> PixelSpec:
        return PixelSpec(self.input_dtype, self.value_max)

    def save(self, directory: str | os.PathLike[str]) -> None:
        write_json(Path(directory) / SPEC_FILE, asdict(self))

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "ServingSpec":
        raw = read_json(Path(directory) / SPEC_FILE)
        return cls(
            shape=tuple(raw["shape"]),
            class_names=tuple(raw["class_names"]),
            sigmoid=raw["sigmoid"],
            ignore_index=raw["ignore_index"],
            input_dtype=raw["input_dtype"],
            value_max=float(raw["value_max"]),
            resize=raw.get("resize", "resize"),  # specs written before patches.resize
            interpolation=raw.get("interpolation", "bilinear"),
        )


class SegmentationServer(tf.Module):
    """What the SavedModel keeps: the network's weights, the TFT layer and the signatures.

    The Keras network itself is kept off the save graph: tracked, a compiled network brings
    its optimizer's slots (two per weight for Adam: 3x the bytes) and Keras's per-layer
    traced functions into the SavedModel. Only its weights are tracked, which is all the
    signatures read, so the SavedModel is the float32 weights plus the graphs."""

    def __init__(self, network: Any, transform_layer: Any, spec: ServingSpec) -> None:
        super().__init__()
        object.__setattr__(self, "network", network)  # untracked: see the class docstring
        self.network_weights = list(network.weights)
        self.transform_layer = transform_layer
        self.spec = spec
        height, width, channels = spec.shape
        self.fixed_size = tf.function(self._fixed_size, input_signature=[tf.TensorSpec([None, height, width, channels], tf.float32, name="pixels")])
        self.serve = {
            name: tf.function(self._serve, input_signature=[tf.TensorSpec([None, None, None, None], dtype, name="images")])
            for name, dtype in DTYPES.items()
        }

    def _fixed_size(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        from segflow.data.preprocessing import RAW_FEATURE, TRANSFORMED_FEATURE
        from segflow.model.losses import probabilities

        normalized = self.transform_layer({RAW_FEATURE: scale_pixels(pixels, self.spec.value_max)})[TRANSFORMED_FEATURE]
        logits = self.network(normalized, training=False)
        return {"probabilities": probabilities(logits, self.spec.sigmoid)}

    def _serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        # Calls of the `fixed_size` function, not a copy of its graph in every signature.
        probs = image_probabilities(
            lambda pixels: self.fixed_size(pixels)["probabilities"], images, self.spec.shape, self.spec.resize, self.spec.interpolation
        )
        return {"mask": tf.cast(tf.argmax(probs, axis=-1), tf.uint8), "probabilities": probs}

    def save(self, model_dir: str | os.PathLike[str], subdir: str = SERVING_SUBDIR) -> Path:
        target = Path(model_dir) / subdir
        signatures = {f"serving_{name}": function for name, function in self.serve.items()}
        signatures["serving_default"] = self.serve[self.spec.input_dtype]
        signatures["fixed_size"] = self.fixed_size
        tf.saved_model.save(self, str(target), signatures=signatures)
        self.spec.save(target)
        return target


def predict_image(fixed_size: FixedSizePredictor, image: np.ndarray, spec: ServingSpec) -> np.ndarray:
    """Class ids [H,W] at the image's own size through a model-size predictor (a TFLite
    export, say), with the same preprocessing, resizing or tiling as `serving_default`."""
    probs = image_probabilities(
        lambda pixels: tf.constant(fixed_size(pixels.numpy())), tf.constant(image[None]), spec.shape, spec.resize, spec.interpolation
    )
    return probs.numpy()[0].argmax(axis=-1).astype(np.uint8)


def fixed_size_mask_predictor(fixed_size: FixedSizePredictor, spec: ServingSpec) -> MaskPredictor:
    return lambda image: predict_image(fixed_size, image, spec)


def serving_mask_predictor(serving_dir: str | os.PathLike[str]) -> MaskPredictor:
    """The signature users call: raw images in, masks out (uint8 or uint16 by the image's dtype)."""
    loaded = tf.saved_model.load(str(serving_dir))

    def predict(image: np.ndarray) -> np.ndarray:
        signature = loaded.signatures[f"serving_{image.dtype.name}"]
        return signature(images=tf.constant(image[None]))["mask"].numpy()[0]

    predict.keepalive = loaded  # type: ignore[attr-defined]  # the signatures need their SavedModel alive
    return predict


def saved_model_predictor(serving_dir: str | os.PathLike[str]) -> FixedSizePredictor:
    """The `fixed_size` signature as a numpy predictor (the reference for converted exports)."""
    loaded = tf.saved_model.load(str(serving_dir))
    signature = loaded.signatures["fixed_size"]

    def predict(pixels: np.ndarray) -> np.ndarray:
        return signature(pixels=tf.constant(pixels, tf.float32))["probabilities"].numpy()

    predict.keepalive = loaded  # type: ignore[attr-defined]
    return predict
