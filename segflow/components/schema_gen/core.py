"""SchemaGen: a tensorflow_metadata Schema (`schema.pbtxt`) inferred from train statistics, or
the schema of an earlier run (`validation.schema`) so that drift between runs is caught.

The schema records what the model was built for (features, types, channel counts, bit depth,
the raw pixel value range, label domain) so that ExampleValidator and later retraining runs
can check new data against it, and the Transform and Trainer read the pixel value scale
(`read_value_max`) from it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from segflow.config.experiment import ExperimentConfig
from segflow.data.preprocessing import effective_value_max
from segflow.utils.io import atomic_dir
from segflow.utils.runtime import log

SCHEMA_FILE = "schema.pbtxt"
PIXEL_VALUE = "pixel_value"
REQUIRED_FEATURES = ("image", "mask", "channels", "bit_depth")


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
    pixel = feature(PIXEL_VALUE, schema_pb2.INT, "raw pixel value (any channel); max: the value scale, train maximum rounded up to 2^k-1")
    pixel.int_domain.CopyFrom(schema_pb2.IntDomain(min=0, max=effective_value_max(train.get("max_pixel_value", (1 << depths[-1]) - 1))))
    labels = schema.int_domain.add(name="class_id", min=0, max=config.num_labels - 1)
    labels.is_categorical = True
    schema.string_domain.add(name="class_names", value=config.class_names)
    return schema


def int_domains(schema: Any) -> dict[str, Any]:
    """Feature name -> IntDomain, for the features that have one."""
    return {feature.name: feature.int_domain for feature in schema.feature if feature.HasField("int_domain")}


def value_max(schema: Any) -> int:
    """The raw pixel value that maps to 1.0: the schema's `pixel_value` maximum; for a schema
    written before that feature existed, the largest value of its largest bit depth."""
    domains = int_domains(schema)
    if PIXEL_VALUE in domains and domains[PIXEL_VALUE].HasField("max"):
        return int(domains[PIXEL_VALUE].max)
    if "bit_depth" in domains and domains["bit_depth"].HasField("max"):
        return (1 << int(domains["bit_depth"].max)) - 1
    raise ValueError(f"the schema has neither a {PIXEL_VALUE!r} nor a 'bit_depth' feature with a maximum")


def read_value_max(schema_dir: str | os.PathLike[str]) -> int:
    """value_max of a SchemaGen output folder (or a schema.pbtxt)."""
    return value_max(read_schema(schema_dir))


def run(config: ExperimentConfig, statistics_dir: str | os.PathLike[str], schema_dir: str | os.PathLike[str]) -> Path:
    from segflow.data.examples import read_statistics

    if config.validation.schema_path:
        schema = read_schema(config.validation.schema_path)
        check_schema(schema, config, _schema_file(config.validation.schema_path))
        log(f"schema_gen: using the schema of {_schema_file(config.validation.schema_path)} (validation.schema)")
    else:
        schema = infer_schema(read_statistics(statistics_dir), config)
    with atomic_dir(schema_dir) as out:
        (out / SCHEMA_FILE).write_text(text_format.MessageToString(schema))
    log(f"schema_gen: pixel value scale {value_max(schema)}")
    return Path(schema_dir) / SCHEMA_FILE


def check_schema(schema: Any, config: ExperimentConfig, source: Path) -> None:
    """A given schema must describe segflow examples of this config's classes."""
    names = {feature.name for feature in schema.feature}
    missing = [name for name in REQUIRED_FEATURES if name not in names]
    if missing:
        raise ValueError(f"{source}: not a segflow schema (no feature {', '.join(missing)})")
    labels = {domain.name: domain for domain in schema.int_domain}.get("class_id")
    if labels is not None and labels.max != config.num_labels - 1:
        raise ValueError(f"{source}: the schema is for {labels.max + 1} classes but the config has {config.num_labels}")
    value_max(schema)  # a scale must be readable


def _schema_file(location: str | os.PathLike[str]) -> Path:
    path = Path(location)
    return path / SCHEMA_FILE if path.is_dir() else path


def read_schema(schema_dir: str | os.PathLike[str]) -> Any:
    """A SchemaGen output folder's schema, or a schema.pbtxt file itself; errors name the file."""
    from tensorflow_metadata.proto.v0 import schema_pb2

    file = _schema_file(schema_dir)
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: no such schema file (expected a SchemaGen output folder or its {SCHEMA_FILE})") from None
    try:
        return text_format.Parse(text, schema_pb2.Schema())
    except text_format.ParseError as error:
        raise ValueError(f"{file}: not a tensorflow_metadata Schema in text format ({error})") from None
