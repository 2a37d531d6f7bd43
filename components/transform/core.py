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

from segflow.config import ExperimentConfig
from segflow.examples import deserialize, split_files
from segflow.io import atomic_dir, write_json
from segflow.preprocessing import PixelSpec, model_pixels_numpy, scale_pixels
from segflow.runtime import beam_options, log

RAW_FEATURE = "image"
TRANSFORMED_FEATURE = "image_xf"
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


def make_preprocessing_fn(normalization: str, value_max: float) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """Per-channel (x - mean) / std ('standard') or (x - min) / (max - min) ('minmax').
    The spread's floor is one raw count, so a constant channel cannot divide by zero while
    a narrow-range channel is still normalised by its real spread."""
    import tensorflow_transform as tft

    min_spread = 1.0 / value_max

    def preprocessing_fn(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = inputs[RAW_FEATURE]
        if normalization == "standard":
            # Every image has the model's shape, so the mean of per-image means is the pixel mean.
            # Sums are float64: Beam combines partial sums in the order its bundles finish, and
            # float32 sums differ in the last bits between runs (which training amplifies);
            # float64 sums rounded to float32 come out the same.
            wide = tf.cast(image, tf.float64)
            mean = tft.mean(tf.reduce_mean(wide, axis=[1, 2]), reduce_instance_dims=False, output_dtype=tf.float64)
            square = tft.mean(tf.reduce_mean(tf.square(wide), axis=[1, 2]), reduce_instance_dims=False, output_dtype=tf.float64)
            offset = tf.cast(mean, tf.float32)
            spread = tf.cast(tf.sqrt(tf.maximum(square - tf.square(mean), 0.0)), tf.float32)
        else:
            offset = tft.min(tf.reduce_min(image, axis=[1, 2]), reduce_instance_dims=False)
            spread = tft.max(tf.reduce_max(image, axis=[1, 2]), reduce_instance_dims=False) - offset
        return {TRANSFORMED_FEATURE: (image - offset) / tf.maximum(spread, min_spread)}

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
    log(f"transform: {pixels.input_dtype} images, value range 0..{pixels.value_max:g}, {config.normalization} normalisation, offset {np.round(normalization['offset'], 4).tolist()}, scale {np.round(normalization['scale'], 4).tolist()}")
    return normalization


def affine_parameters(transform_dir: str, config: ExperimentConfig) -> dict[str, Any]:
    """The learnt transform is per-channel affine, x * scale + offset; read it back by
    applying the graph to images of zeros and ones (a readable record and a self-check)."""
    layer = transform_layer(transform_dir)
    probe = np.stack([np.zeros(config.shape, np.float32), np.ones(config.shape, np.float32)])
    result = layer({RAW_FEATURE: tf.constant(probe)})[TRANSFORMED_FEATURE].numpy()
    offset = result[0, 0, 0]
    return {"normalization": config.normalization, "offset": offset.tolist(), "scale": (result[1, 0, 0] - offset).tolist()}


def transform_layer(transform_dir: str | os.PathLike[str]) -> Any:
    """The TFT graph as a Keras layer: {'image': [B,H,W,C] in [0,1]} -> {'image_xf': ...}."""
    import tensorflow_transform as tft

    return tft.TFTransformOutput(str(transform_dir)).transform_features_layer()


if __name__ == "__main__":
    _analyze_and_exit(*sys.argv[1:3])
