"""SchemaGen: infer a tensorflow_metadata Schema (`schema.pbtxt`) from train statistics.

The schema records what the model was built for (features, types, channel counts,
label domain) so that ExampleValidator and later retraining runs can check new data
against it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from segflow.config import ExperimentConfig
from segflow.io import atomic_dir

SCHEMA_FILE = "schema.pbtxt"


def infer_schema(statistics: dict[str, Any], config: ExperimentConfig) -> Any:
    from tensorflow_metadata.proto.v0 import schema_pb2

    schema = schema_pb2.Schema()

    def feature(name: str, kind: int, description: str) -> Any:
        entry = schema.feature.add(name=name, type=kind)
        entry.presence.min_fraction = 1.0
        entry.presence.min_count = 1
        entry.shape.dim.add(size=1)
        entry.annotation.comment.append(description)
        return entry

    feature("image", schema_pb2.BYTES, "lossless PNG of the original image")
    feature("mask", schema_pb2.BYTES, "PNG of class ids")
    feature("filename", schema_pb2.BYTES, "source image file name")
    train = statistics["train"]
    channels = sorted(int(value) for value in train["source_channels"])
    feature("channels", schema_pb2.INT, "image channels").int_domain.CopyFrom(schema_pb2.IntDomain(min=channels[0], max=channels[-1]))
    depths = sorted(int(value) for value in train["bit_depths"])
    feature("bit_depth", schema_pb2.INT, "bits per channel").int_domain.CopyFrom(schema_pb2.IntDomain(min=depths[0], max=depths[-1]))
    for name in ("height", "width"):
        feature(name, schema_pb2.INT, f"image {name} in pixels").int_domain.CopyFrom(schema_pb2.IntDomain(min=1))
    labels = schema.int_domain.add(name="class_id", min=0, max=config.num_labels - 1)
    labels.is_categorical = True
    schema.string_domain.add(name="class_names", value=config.class_names)
    return schema


def run(config: ExperimentConfig, statistics_dir: str | os.PathLike[str], schema_dir: str | os.PathLike[str]) -> Path:
    from segflow.components.statistics_gen.core import read_statistics

    schema = infer_schema(read_statistics(statistics_dir), config)
    with atomic_dir(schema_dir) as out:
        (out / SCHEMA_FILE).write_text(text_format.MessageToString(schema))
    return Path(schema_dir) / SCHEMA_FILE


def read_schema(schema_dir: str | os.PathLike[str]) -> Any:
    from tensorflow_metadata.proto.v0 import schema_pb2

    return text_format.Parse((Path(schema_dir) / SCHEMA_FILE).read_text(), schema_pb2.Schema())
