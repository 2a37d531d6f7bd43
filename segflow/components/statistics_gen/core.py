"""StatisticsGen: per-split dataset statistics computed with a Beam CombineFn.

Written twice: `statistics.json` for people and scripts, and TFX's
`Split-<name>/FeatureStats.pb` (a DatasetFeatureStatisticsList) for TFX/TFDV tools.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import tensorflow as tf

from segflow.config.experiment import ExperimentConfig
from segflow.console import Progress
from segflow.data.examples import (
    STATISTICS_FILE,
    deserialize,
    pixel_scale,
    present_splits,
    split_dir,
    split_files,
)
from segflow.data.preprocessing import to_model_channels
from segflow.utils.io import atomic_dir, read_json, write_json
from segflow.utils.runtime import beam_options, log

PROTO_FILE = "FeatureStats.pb"


MAX_SOURCE_CHANNELS = 4


STEP = "statistics_gen: statistics"  # the console's progress step


class SplitStatisticsFn(beam.CombineFn):
    """Sums over examples; image statistics are on pixels scaled to [0, 1] in the model's channels,
    except the raw value range (`max_pixel_value`, `channel_raw_min`/`channel_raw_max` per source
    channel), which is in the source's own units: a 12-bit camera's 16-bit files give at most 4095."""

    def __init__(self, num_labels: int, channels: int, ignore_index: int | None) -> None:
        self.num_labels = num_labels
        self.channels = channels
        self.ignore_index = ignore_index
        self.counter: Progress | None = None  # made on the worker

    def create_accumulator(self) -> dict[str, Any]:
        return {
            "count": 0,
            "sizes": Counter(),
            "source_channels": Counter(),
            "bit_depths": Counter(),
            "pixel_sum": np.zeros(self.channels),
            "pixel_square_sum": np.zeros(self.channels),
            "pixels": 0,
            "class_pixels": np.zeros(self.num_labels, np.int64),
            "ignored_pixels": 0,
            "empty_masks": 0,
            "raw_min": np.full(MAX_SOURCE_CHANNELS, np.iinfo(np.int64).max),
            "raw_max": np.full(MAX_SOURCE_CHANNELS, -1),
        }

    def add_input(self, acc: dict[str, Any], record: bytes) -> dict[str, Any]:
        if self.counter is None:
            self.counter = Progress(STEP)
        self.counter.add()
        example = deserialize(record)
        height, width, channels = example.image.shape
        # The model's channels, converted as the model input is (one definition of that).
        model_channels = to_model_channels(tf.constant(example.image, tf.float32), self.channels).numpy()
        pixels = model_channels.astype(np.float64) / pixel_scale(example.bit_depth)
        acc["count"] += 1
        acc["sizes"][f"{height}x{width}"] += 1
        acc["source_channels"][str(channels)] += 1
        acc["bit_depths"][str(example.bit_depth)] += 1
        acc["pixel_sum"] += pixels.sum(axis=(0, 1))
        acc["pixel_square_sum"] += np.square(pixels).sum(axis=(0, 1))
        acc["pixels"] += height * width
        labels = example.mask.reshape(-1)
        if self.ignore_index is not None:
            acc["ignored_pixels"] += int((labels == self.ignore_index).sum())
        counts = np.bincount(labels[labels < self.num_labels], minlength=self.num_labels)
        acc["class_pixels"] += counts
        acc["empty_masks"] += int(counts[1:].sum() == 0)
        flat = example.image.reshape(-1, channels)
        acc["raw_min"][:channels] = np.minimum(acc["raw_min"][:channels], flat.min(axis=0))
        acc["raw_max"][:channels] = np.maximum(acc["raw_max"][:channels], flat.max(axis=0))
        return acc

    def merge_accumulators(self, accumulators: Any) -> dict[str, Any]:
        merged = self.create_accumulator()
        for acc in accumulators:
            for key, value in acc.items():
                if key == "raw_min":
                    merged[key] = np.minimum(merged[key], value)
                elif key == "raw_max":
                    merged[key] = np.maximum(merged[key], value)
                else:
                    merged[key] = merged[key] + value
        return merged

    def extract_output(self, acc: dict[str, Any]) -> dict[str, Any]:
        pixels = max(acc["pixels"], 1)
        mean = acc["pixel_sum"] / pixels
        std = np.sqrt(np.maximum(acc["pixel_square_sum"] / pixels - mean**2, 0.0))
        labelled = max(int(acc["class_pixels"].sum()), 1)
        seen = int((acc["raw_max"] >= 0).sum())  # source channels present in some image
        return {
            "count": acc["count"],
            "image_sizes": dict(acc["sizes"].most_common()),
            "source_channels": dict(acc["source_channels"]),
            "bit_depths": dict(acc["bit_depths"]),
            "channel_mean": mean.tolist(),
            "channel_std": std.tolist(),
            "class_pixels": acc["class_pixels"].tolist(),
            "class_frequency": (acc["class_pixels"] / labelled).tolist(),
            "ignored_pixel_share": acc["ignored_pixels"] / pixels,
            "empty_mask_share": acc["empty_masks"] / max(acc["count"], 1),
            "max_pixel_value": int(acc["raw_max"].max(initial=0)),
            "channel_raw_min": acc["raw_min"][:seen].tolist(),
            "channel_raw_max": acc["raw_max"][:seen].tolist(),
        }


def to_proto(statistics: dict[str, Any], split: str, class_names: list[str]) -> Any:
    """One split's statistics as a DatasetFeatureStatisticsList."""
    from tensorflow_metadata.proto.v0 import statistics_pb2

    result = statistics_pb2.DatasetFeatureStatisticsList()
    dataset = result.datasets.add(name=split, num_examples=statistics["count"])
    for index, (mean, std) in enumerate(zip(statistics["channel_mean"], statistics["channel_std"])):
        feature = dataset.features.add(type=statistics_pb2.FeatureNameStatistics.FLOAT)
        feature.path.step.append(f"image_channel_{index}")
        feature.num_stats.mean = mean
        feature.num_stats.std_dev = std
        feature.num_stats.common_stats.num_non_missing = statistics["count"]
    mask = dataset.features.add(type=statistics_pb2.FeatureNameStatistics.INT)
    mask.path.step.append("mask")
    mask.num_stats.common_stats.num_non_missing = statistics["count"]
    for name, frequency in zip(class_names, statistics["class_frequency"]):
        mask.custom_stats.add(name=f"class_frequency/{name}", num=frequency)
    mask.custom_stats.add(name="empty_mask_share", num=statistics["empty_mask_share"])
    image = dataset.features.add(type=statistics_pb2.FeatureNameStatistics.BYTES)
    image.path.step.append("image")
    image.bytes_stats.common_stats.num_non_missing = statistics["count"]
    for size, count in statistics["image_sizes"].items():
        image.custom_stats.add(name=f"size/{size}", num=count)
    for depth, count in statistics["bit_depths"].items():
        image.custom_stats.add(name=f"bit_depth/{depth}", num=count)
    image.custom_stats.add(name="max_pixel_value", num=statistics["max_pixel_value"])
    return result


def run(config: ExperimentConfig, examples_dir: str | os.PathLike[str], statistics_dir: str | os.PathLike[str]) -> dict[str, Any]:
    from segflow.data.examples import read_counts

    scratch = Path(tempfile.mkdtemp(prefix="segflow-beam-"))
    combine = SplitStatisticsFn(config.num_labels, config.shape[2], config.ignore_index)
    try:
        splits = present_splits(examples_dir)
        total = sum(read_counts(examples_dir)[f"{split}_examples"] for split in splits)
        counter = Progress(STEP, total)  # the workers count; their last counts may come unreported
        with beam.Pipeline(options=beam_options(config.beam, scratch)) as pipeline:
            for split in splits:
                (
                    pipeline
                    | f"Files{split}" >> beam.Create(split_files(examples_dir, split))
                    | f"Read{split}" >> beam.io.ReadAllFromTFRecord(compression_type=beam.io.filesystem.CompressionTypes.GZIP)
                    | f"Stats{split}" >> beam.CombineGlobally(combine)
                    | f"Json{split}" >> beam.Map(json.dumps)
                    | f"Write{split}" >> beam.io.WriteToText(str(scratch / split), shard_name_template="")
                )
        counter.end(done=total)
        statistics = {"class_names": config.class_names}
        for split in splits:
            statistics[split] = read_json(scratch / split)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    with atomic_dir(statistics_dir) as out:
        write_json(out / STATISTICS_FILE, statistics)
        for split in splits:
            split_dir(out, split).mkdir()
            (split_dir(out, split) / PROTO_FILE).write_bytes(to_proto(statistics[split], split, config.class_names).SerializeToString())
    train = statistics["train"]
    log(
        "statistics_gen: train mean "
        + ", ".join(f"{v:.3f}" for v in train["channel_mean"])
        + " | class frequency "
        + ", ".join(f"{n} {f:.3f}" for n, f in zip(config.class_names, train["class_frequency"]))
    )
    return statistics


