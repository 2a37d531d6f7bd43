"""Transform: dataset-wide normalisation computed by tensorflow-transform analyzers.

The analyzers run over the train split with Beam; the resulting transform graph is
applied by the trainer's input pipeline and embedded in the exported model, so a
served model takes raw pixels and can never drift from its training statistics.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from segflow.config.experiment import ExperimentConfig, NormalizationConfig
from segflow.data.examples import deserialize, split_files
from segflow.data.preprocessing import (
    RAW_FEATURE,
    TRANSFORMED_FEATURE,
    PixelSpec,
    model_pixels_numpy,
    scale_pixels,
)
from segflow.utils.io import atomic_dir, write_json
from segflow.utils.runtime import beam_options, log

NORMALIZATION_FILE = "normalization.json"


def scaled_model_pixels(record: bytes, shape: list[int], pixels: PixelSpec) -> np.ndarray:
    """An example's image as the network's input sees it before normalisation (HxWxC at the
    model size, scaled to [0, 1]), so that the statistics are those of training and serving."""
    example = deserialize(record)
    return scale_pixels(model_pixels_numpy(example.image, shape), pixels.value_max).numpy()[0]


def pixel_spec(schema_dir: str | os.PathLike[str]) -> PixelSpec:
    """The value range every later step scales by, read from the schema (so a retraining run
    with `validation.schema` keeps the scale its predecessor was trained with)."""
    from segflow.components.schema_gen.core import read_schema, value_max

    schema = read_schema(schema_dir)
    depths = {feature.name: feature.int_domain for feature in schema.feature}["bit_depth"]
    return PixelSpec.from_domain(depths.max, value_max(schema))


CLIP_FEATURES = ("clip_low", "clip_high")  # the analysed clip bounds, per channel, beside the image (for normalization.json)
QUANTILE_BUCKETS = 1000  # percentiles to 0.1
QUANTILE_STRIDE = 4  # every 4th row and column feed the quantile sketch: 1/16 of the pixels, same percentiles within a sketch's error


def make_preprocessing_fn(normalization: NormalizationConfig, value_max: float) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """Per channel: clip to the train pixels' percentiles (`clip_percentiles`), then
    'standard' (x - mean) / std (the data's, of the clipped pixels, or fixed values),
    'minmax' (x - min) / (max - min) mapped to `range`, 'max' x / max, or 'none'. The
    spread's floor is one raw count, so a constant channel cannot divide by zero while a
    narrow-range channel is still normalised by its real spread."""
    import tensorflow_transform as tft

    min_spread = 1.0 / value_max
    method = normalization.method

    def preprocessing_fn(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = inputs[RAW_FEATURE]
        channels = image.shape[-1]
        low = tf.zeros([channels])
        high = tf.ones([channels])
        if normalization.clip_percentiles is not None:
            sampled = tf.reshape(image[:, ::QUANTILE_STRIDE, ::QUANTILE_STRIDE, :], [-1, channels])
            boundaries = tft.quantiles(sampled, QUANTILE_BUCKETS, epsilon=0.5 / QUANTILE_BUCKETS, reduce_instance_dims=False)
            boundaries = tf.reshape(boundaries, [channels, -1])  # [C, QUANTILE_BUCKETS - 1]: boundary i is percentile (i + 1) / 10
            low_percentile, high_percentile = normalization.clip_percentiles
            if low_percentile is not None and low_percentile > 0:
                low = boundaries[:, round(low_percentile / 100 * QUANTILE_BUCKETS) - 1]
            if high_percentile is not None and high_percentile < 100:
                high = boundaries[:, min(round(high_percentile / 100 * QUANTILE_BUCKETS), QUANTILE_BUCKETS - 1) - 1]
            image = tf.clip_by_value(image, low, high)
        if method == "standard" and normalization.mean is not None:
            offset, spread = tf.constant(normalization.mean, tf.float32), tf.constant(normalization.std, tf.float32)
        elif method == "standard":
            # Every image has the model's shape, so the mean of per-image means is the pixel mean.
            # Sums are float64: Beam combines partial sums in the order its bundles finish, and
            # float32 sums differ in the last bits between runs (which training amplifies);
            # float64 sums rounded to float32 come out the same.
            wide = tf.cast(image, tf.float64)
            mean = tft.mean(tf.reduce_mean(wide, axis=[1, 2]), reduce_instance_dims=False, output_dtype=tf.float64)
            square = tft.mean(tf.reduce_mean(tf.square(wide), axis=[1, 2]), reduce_instance_dims=False, output_dtype=tf.float64)
            offset = tf.cast(mean, tf.float32)
            spread = tf.cast(tf.sqrt(tf.maximum(square - tf.square(mean), 0.0)), tf.float32)
        elif method == "minmax":
            minimum = tft.min(tf.reduce_min(image, axis=[1, 2]), reduce_instance_dims=False)
            spread = (tft.max(tf.reduce_max(image, axis=[1, 2]), reduce_instance_dims=False) - minimum) / (normalization.range[1] - normalization.range[0])
            offset = minimum - normalization.range[0] * spread
        elif method == "max":
            offset, spread = tf.zeros([channels]), tft.max(tf.reduce_max(image, axis=[1, 2]), reduce_instance_dims=False)
        else:
            offset, spread = tf.zeros([channels]), tf.ones([channels])
        batch = tf.shape(image)[:1]
        return {
            TRANSFORMED_FEATURE: (image - offset) / tf.maximum(spread, min_spread),
            CLIP_FEATURES[0]: tf.broadcast_to(low, tf.concat([batch, [channels]], 0)),
            CLIP_FEATURES[1]: tf.broadcast_to(high, tf.concat([batch, [channels]], 0)),
        }

    return preprocessing_fn


def analyze(config: ExperimentConfig, pixels: PixelSpec, examples_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str]) -> None:
    """Run the TFT analyzers over the train split with Beam and write the transform graph."""
    import apache_beam as beam
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

    height, width, channels = config.shape
    metadata = dataset_metadata.DatasetMetadata(
        schema_utils.schema_from_feature_spec({RAW_FEATURE: tf.io.FixedLenFeature([height, width, channels], tf.float32)})
    )
    scratch = Path(tempfile.mkdtemp(prefix="segflow-tft-"))
    try:
        options = beam_options(config.beam, scratch)
        with beam.Pipeline(options=options) as pipeline, tft_beam.Context(temp_dir=str(scratch)):
            images = (
                pipeline
                | "TrainFiles" >> beam.Create(split_files(examples_dir, "train"))
                | "Read" >> beam.io.ReadAllFromTFRecord(compression_type=beam.io.filesystem.CompressionTypes.GZIP)
                | "ModelPixels" >> beam.Map(lambda record: {RAW_FEATURE: scaled_model_pixels(record, config.shape, pixels)})
            )
            transform_fn = (images, metadata) | "Analyze" >> tft_beam.AnalyzeDataset(make_preprocessing_fn(config.normalization, pixels.value_max))
            _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(str(output_dir))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _analyze_and_exit(examples_dir: str, output_dir: str) -> None:
    """Child-process entry point (config JSON on stdin). TFT 1.21 + TF 2.21 segfault in the
    garbage collection at interpreter exit after a Beam analysis, which would turn a
    finished step into a failed one; the child leaves with os._exit once its output is
    written, skipping that teardown."""
    try:
        analyze(ExperimentConfig.from_json(sys.stdin.read()), PixelSpec.load(output_dir), examples_dir, output_dir)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(
    config: ExperimentConfig, examples_dir: str | os.PathLike[str], schema_dir: str | os.PathLike[str], transform_dir: str | os.PathLike[str]
) -> dict[str, Any]:
    pixels = pixel_spec(schema_dir)
    with atomic_dir(transform_dir) as out:
        pixels.save(out)  # the child process reads it; the Trainer puts it in the serving spec
        child = subprocess.run([sys.executable, "-m", __name__, str(examples_dir), str(out)], input=config.to_json(), text=True, check=False)
        if child.returncode != 0:
            raise RuntimeError(f"TFT analysis failed (exit code {child.returncode}); see the traceback above")
        normalization = affine_parameters(str(out), config)
        write_json(out / NORMALIZATION_FILE, normalization)
    clipped = "" if config.normalization.clip_percentiles is None else f"clipped to {np.round(normalization['clip'], 4).tolist()}, "
    log(
        f"transform: {pixels.input_dtype} images, value range 0..{pixels.value_max:g}, {clipped}{config.normalization.method} normalisation, "
        f"offset {np.round(normalization['offset'], 4).tolist()}, scale {np.round(normalization['scale'], 4).tolist()}"
    )
    return normalization


def affine_parameters(transform_dir: str, config: ExperimentConfig) -> dict[str, Any]:
    """The learnt transform is per channel a clip to [clip_low, clip_high] then x * scale +
    offset; read it back by applying the graph to images at both clip bounds (a readable
    record and a self-check)."""
    layer = transform_layer(transform_dir)
    bounds = layer({RAW_FEATURE: tf.constant(np.zeros([1, *config.shape], np.float32))})
    low, high = (bounds[name].numpy()[0] for name in CLIP_FEATURES)
    probe = np.stack([np.broadcast_to(low, config.shape), np.broadcast_to(high, config.shape)]).astype(np.float32)
    result = layer({RAW_FEATURE: tf.constant(probe)})[TRANSFORMED_FEATURE].numpy()
    span = np.where(high > low, high - low, 1.0)
    scale = (result[1, 0, 0] - result[0, 0, 0]) / span
    offset = result[0, 0, 0] - low * scale
    return {
        "normalization": config.normalization.method,
        "clip": [low.tolist(), high.tolist()],
        "offset": offset.tolist(),
        "scale": scale.tolist(),
    }


def transform_layer(transform_dir: str | os.PathLike[str]) -> Any:
    """The TFT graph as a Keras layer: {'image': [B,H,W,C] in [0,1]} -> {'image_xf': ...}."""
    import tensorflow_transform as tft

    return tft.TFTransformOutput(str(transform_dir)).transform_features_layer()


if __name__ == "__main__":
    _analyze_and_exit(*sys.argv[1:3])
