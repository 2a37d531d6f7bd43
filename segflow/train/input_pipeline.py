"""The trainer's tf.data streams, moved out of segflow/components/trainer/core.py.

GZIP TFRecords -> decode (any bit depth, model channels) -> resize (or full resolution,
`patches`) -> cache -> shuffle -> crops (segflow.data.patches) -> augmentation policy ->
batch -> TFT normalisation -> prefetch. A training stream is a function of (seed, epoch,
file name), not of thread scheduling, so the same data and config give the same batches.
`batching` sizes the streams for the distribution plan (global batch, steps per epoch).
"""
from __future__ import annotations

import functools
import math
import os
import threading
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from segflow.config.experiment import ExperimentConfig
from segflow.data.augment import apply_policy, build_policy, example_seed
from segflow.data.examples import split_files
from segflow.data.error_maps import ErrorMaps
from segflow.data.patches import crop_plan, grid_tiles, model_mask, sample_crop
from segflow.data.preprocessing import PixelSpec, model_pixels, scale_pixels
from segflow.data.tf_augment import build_tf_policy, example_seed_tensor
from segflow.train.distribute import Plan, evaluation_batch, shard_by_data
from segflow.utils.runtime import log

CACHE_BUDGET_BYTES = 2 * 1024**3  # decoded, resized examples kept in RAM up to this size
SHUFFLE_BUFFER = 1024
CROP_SHUFFLE_BUFFER = 256  # crops of one image, mixed with the next images' (patches.crops_per_image)


def cache_bytes(examples: int, shape: list[int]) -> int:
    """RAM that caching a split needs: float32 image plus uint8 mask per example."""
    height, width, channels = shape
    return examples * height * width * (4 * channels + 1)


def train_inputs(config: ExperimentConfig, examples_dir: str | os.PathLike[str]) -> int:
    """Model inputs in a training epoch: one per train example, or its crops (`patches`)."""
    from segflow.data.examples import read_counts

    return read_counts(examples_dir)["train_examples"] * config.patches.crops_per_image


def _decoded_shape(config: ExperimentConfig, examples_dir: str | os.PathLike[str], split: str) -> list[int]:
    """The size of a decoded example: the model's, or at full resolution (`patches.resize`
    none) the split's first image's, which stands for the others (the cache estimate)."""
    if config.patches.resize != "none":
        return config.shape
    from segflow.data.examples import iter_split

    first = next(iter(iter_split(examples_dir, split)), None)
    return config.shape if first is None else [*first.image.shape[:2], config.shape[2]]


def split_records(examples_dir: str | os.PathLike[str], split: str) -> tf.data.TFRecordDataset:
    """The split's serialized examples (ExampleGen's GZIP shards)."""
    return tf.data.TFRecordDataset(split_files(examples_dir, split), compression_type="GZIP")


def decode_example(record: tf.Tensor, config: ExperimentConfig, pixels: PixelSpec) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(image scaled to [0, 1], mask, file name), at the model size, or at full resolution
    with `patches.resize` none (segflow.data.patches cuts them)."""
    height, width, channels = config.shape
    features = tf.io.parse_single_example(
        record,
        {
            "image": tf.io.FixedLenFeature([], tf.string),
            "mask": tf.io.FixedLenFeature([], tf.string),
            "bit_depth": tf.io.FixedLenFeature([], tf.int64),
            "filename": tf.io.FixedLenFeature([], tf.string),
        },
    )
    # decode_png as uint16 stretches 8-bit files by 257; undo that to keep raw counts.
    wide = tf.io.decode_png(features["image"], channels=0, dtype=tf.uint16)
    raw = tf.where(features["bit_depth"] == 8, wide // 257, wide)
    image = scale_pixels(model_pixels(raw[None], config.shape, config.patches.resize, config.patches.interpolation)[0], pixels.value_max)
    mask = model_mask(tf.io.decode_png(features["mask"], channels=1), config.shape, config.patches.resize, config.ignore_index)
    size = [None, None] if config.patches.resize == "none" else [height, width]
    return tf.ensure_shape(image, [*size, channels]), tf.ensure_shape(tf.cast(mask, tf.uint8), size), features["filename"]


def _augmenter(config: ExperimentConfig) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]] | None:
    """A tf.data map function applying the augmentation policy with a per-example,
    per-epoch seed: as TF ops when every entry has a TF version (segflow/data/tf_augment.py: no
    GIL, parallel), else albumentations in a numpy_function, where each thread has its own
    policy object so seeding it is race-free."""
    if not config.augmentation:
        return None
    height, width, channels = config.shape
    graph_policy = build_tf_policy(build_policy(config.augmentation, ignore_index=config.ignore_index), (height, width, channels))
    if graph_policy is not None:

        def augment_graph(image: tf.Tensor, mask: tf.Tensor, filename: tf.Tensor, epoch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return graph_policy(image, mask, example_seed_tensor(config.seed, epoch, filename))

        return augment_graph
    local = threading.local()

    def augment(image: np.ndarray, mask: np.ndarray, filename: bytes, epoch: np.int64) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(local, "policy"):
            local.policy = build_policy(config.augmentation, ignore_index=config.ignore_index)
        return apply_policy(local.policy, image, mask, example_seed(config.seed, int(epoch), filename.decode()))

    def augment_tf(image: tf.Tensor, mask: tf.Tensor, filename: tf.Tensor, epoch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image, mask = tf.numpy_function(augment, [image, mask, filename, epoch], [tf.float32, tf.uint8], stateful=False)
        return tf.ensure_shape(image, [height, width, channels]), tf.ensure_shape(mask, [height, width])

    return augment_tf


def make_dataset(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    split: str,
    transform_layer: Any,
    pixels: PixelSpec,
    epochs: tuple[int, int] | None = None,
    batch: int | None = None,
    drop_remainder: bool = False,
    negatives: str | int | None = None,
    error_maps: ErrorMaps | None = None,
) -> tf.data.Dataset:
    """Batches of (normalised image, mask). With `epochs` (first, end) it is the training
    stream for those epochs: shuffled and augmented per epoch from seeds, so that the
    same data and config give the same batches whatever the thread scheduling. `batch` is
    the global batch (default: config `batch`); under several workers the stream is sharded
    by element (policy DATA), so each worker keeps its replicas' part of every batch;
    `drop_remainder` drops a short last batch (per epoch), which would leave a replica empty;
    `negatives` is the stage's crop balance (segflow.data.patches.crop_plan); `error_maps` are
    the hard negatives' (segflow.data.error_maps), read as the crops are drawn."""
    from segflow.data.examples import read_counts
    from segflow.data.preprocessing import RAW_FEATURE, TRANSFORMED_FEATURE

    records = split_records(examples_dir, split)
    decoded = records.map(lambda record: decode_example(record, config, pixels), num_parallel_calls=tf.data.AUTOTUNE)
    batch = batch or config.batch
    needed = cache_bytes(read_counts(examples_dir)[f"{split}_examples"], _decoded_shape(config, examples_dir, split))
    if needed <= CACHE_BUDGET_BYTES:
        decoded = decoded.cache()
    else:  # decoding every epoch is slower than RAM, but never runs the machine out of memory
        log(f"trainer: {split} split needs {needed / 1024**3:.1f} GiB decoded; not caching it in RAM")
    if epochs is None:
        batches = _evaluation_batches(config, decoded, batch, drop_remainder)
    else:
        batches = _training_batches(config, decoded, epochs, batch, drop_remainder, negatives, error_maps)
    normalized = batches.map(
        lambda image, mask: (transform_layer({RAW_FEATURE: image})[TRANSFORMED_FEATURE], mask), num_parallel_calls=tf.data.AUTOTUNE
    )
    if error_maps is not None:  # its crops may wait for a refresh: on threads of its own, never the refresh's
        options = tf.data.Options()
        options.threading.private_threadpool_size = max(4, os.cpu_count() or 1)
        normalized = normalized.with_options(options)
    return shard_by_data(normalized.prefetch(tf.data.AUTOTUNE))


def _evaluation_batches(config: ExperimentConfig, decoded: tf.data.Dataset, batch: int, drop_remainder: bool) -> tf.data.Dataset:
    """Every example once, in order (at full resolution: every pixel, in tiles of the model size)."""
    patches, tile = config.patches, (config.shape[0], config.shape[1])
    pairs = decoded.map(lambda image, mask, _: (image, mask))
    if patches.resize == "none":  # every pixel, in tiles of the model size
        pairs = pairs.flat_map(lambda image, mask: tf.data.Dataset.from_tensor_slices(grid_tiles(image, mask, tile, config.ignore_index)))
    return pairs.batch(batch, drop_remainder=drop_remainder)


def _training_batches(
    config: ExperimentConfig,
    decoded: tf.data.Dataset,
    epochs: tuple[int, int],
    batch: int,
    drop_remainder: bool,
    negatives: str | int | None,
    error_maps: ErrorMaps | None,
) -> tf.data.Dataset:
    """Epochs [first, end) one after another, each shuffled, cropped and augmented from seeds."""
    patches, tile = config.patches, (config.shape[0], config.shape[1])
    augment = _augmenter(config)
    hard_share = patches.hard_negatives.share if error_maps is not None and patches.hard_negatives else 0.0
    cropping = crop_plan(patches.positive_share, negatives, hard_share)

    def crops(image: tf.Tensor, mask: tf.Tensor, name: tf.Tensor, epoch: int) -> tf.data.Dataset:
        """`crops_per_image` crops of one example, each from its own stateless seed."""
        seed = tf.random.experimental.stateless_fold_in(example_seed_tensor(config.seed, tf.constant(epoch, tf.int64), name), 1)
        errors = error_maps.candidates(name, epoch) if hard_share else None
        draws = [sample_crop(image, mask, tf.random.experimental.stateless_fold_in(seed, draw), tile, cropping, config.ignore_index, errors)
                 for draw in range(patches.crops_per_image)]
        names = tf.strings.join([name, tf.strings.as_string(tf.range(patches.crops_per_image))], separator="#")
        return tf.data.Dataset.from_tensor_slices((tf.stack([draw[0] for draw in draws]), tf.stack([draw[1] for draw in draws]), names))

    def one_epoch(epoch: int) -> tf.data.Dataset:
        # One dataset per epoch with a Python seed: order and augmentation draws are
        # functions of (seed, epoch, file name), not of thread scheduling.
        shuffled = decoded.shuffle(SHUFFLE_BUFFER, seed=config.seed * 100_003 + epoch, reshuffle_each_iteration=False)
        if patches.resize == "none":  # crops of one image are mixed with the others' before batching
            shuffled = shuffled.flat_map(lambda image, mask, name: crops(image, mask, name, epoch))
            if patches.crops_per_image > 1:
                shuffled = shuffled.shuffle(CROP_SHUFFLE_BUFFER, seed=config.seed * 100_003 + epoch, reshuffle_each_iteration=False)
        if augment is None:
            examples = shuffled.map(lambda image, mask, _: (image, mask))
        else:
            examples = shuffled.map(lambda image, mask, name: augment(image, mask, name, tf.constant(epoch, tf.int64)), num_parallel_calls=tf.data.AUTOTUNE)
        return examples.batch(batch, drop_remainder=drop_remainder)

    return functools.reduce(tf.data.Dataset.concatenate, (one_epoch(epoch) for epoch in range(*epochs)))


def batching(
    config: ExperimentConfig, plan: Plan, examples_dir: str | os.PathLike[str], transform_layer: Any, pixels: PixelSpec
) -> Callable[[int], tuple[int, int, tf.data.Dataset]]:
    """The run's sizes as a function of the per-replica batch, which running out of memory
    halves mid-run: (global batch, steps per epoch, validation stream). The split sizes are read once."""
    from segflow.data.examples import read_counts

    counts = read_counts(examples_dir)
    inputs = train_inputs(config, examples_dir)

    def at(batch: int) -> tuple[int, int, tf.data.Dataset]:
        """(global batch, steps per epoch, validation stream) at `batch` per replica."""
        global_batch = plan.global_batch(batch)
        if plan.replicas == 1:
            steps_per_epoch = math.ceil(inputs / global_batch)
            eval_batch, eval_drop = global_batch, False
        else:  # a short last batch could leave a replica empty: drop it (another one each epoch)
            if inputs < global_batch:
                raise ValueError(
                    f"trainer: {counts['train_examples']} training examples are fewer than one global batch of {global_batch} "
                    f"({batch} per replica x {plan.replicas} replicas); lower `batch`"
                )
            steps_per_epoch = inputs // global_batch
            eval_batch, eval_drop = evaluation_batch(counts["eval_examples"], plan.replicas, batch)
        return global_batch, steps_per_epoch, make_dataset(config, examples_dir, "eval", transform_layer, pixels, batch=eval_batch, drop_remainder=eval_drop)

    return at
