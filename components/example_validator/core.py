"""ExampleValidator: data anomalies that would make training or evaluation misleading.

Each anomaly has a code, the split it concerns and a message. `validation.on_anomaly:
fail` stops the pipeline (before training); `warn` records and prints them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from segflow.config import ExperimentConfig
from segflow.io import atomic_dir, read_json, write_json
from segflow.runtime import log

ANOMALIES_FILE = "anomalies.json"


class DataValidationError(RuntimeError):
    """Anomalies found while `validation.on_anomaly` is `fail`."""


def find_anomalies(statistics: dict[str, Any], schema: Any, config: ExperimentConfig) -> list[dict[str, str]]:
    names = config.class_names
    train, evaluation = statistics["train"], statistics["eval"]
    anomalies: list[dict[str, str]] = []

    def add(code: str, split: str, message: str) -> None:
        anomalies.append({"code": code, "split": split, "message": message})

    for index, name in enumerate(names):
        if train["class_pixels"][index] == 0:
            add("CLASS_ABSENT_FROM_TRAIN", "train", f"class {name!r} (id {index}) has no pixel in the train split")
        elif evaluation["class_pixels"][index] == 0:
            add("CLASS_ABSENT_FROM_EVAL", "eval", f"class {name!r} (id {index}) has no pixel in the eval split; its IoU is undefined")
    shift = max(abs(a - b) for a, b in zip(train["class_frequency"], evaluation["class_frequency"]))
    if shift > config.validation.max_class_shift:
        add(
            "CLASS_DISTRIBUTION_SHIFT",
            "eval",
            f"eval class frequencies differ from train by {shift:.3f} (L-infinity) > validation.max_class_shift {config.validation.max_class_shift}",
        )
    domain = {feature.name: feature.int_domain for feature in schema.feature}
    for split, stats in (("train", train), ("eval", evaluation)):
        if stats["empty_mask_share"] == 1.0:
            add("ALL_MASKS_EMPTY", split, f"every {split} mask is background only")
        for channels in stats["source_channels"]:
            if not domain["channels"].min <= int(channels) <= domain["channels"].max:
                add("OUT_OF_DOMAIN", split, f"{split} has {channels}-channel images; the schema allows {domain['channels'].min}..{domain['channels'].max}")
    return anomalies


def run(
    config: ExperimentConfig,
    statistics_dir: str | os.PathLike[str],
    schema_dir: str | os.PathLike[str],
    anomalies_dir: str | os.PathLike[str],
) -> list[dict[str, str]]:
    from segflow.components.schema_gen.core import read_schema
    from segflow.components.statistics_gen.core import read_statistics

    anomalies = find_anomalies(read_statistics(statistics_dir), read_schema(schema_dir), config)
    with atomic_dir(anomalies_dir) as out:
        write_json(out / ANOMALIES_FILE, {"count": len(anomalies), "anomalies": anomalies})
    for anomaly in anomalies:
        log(f"example_validator: {anomaly['code']} ({anomaly['split']}): {anomaly['message']}")
    if anomalies and config.validation.on_anomaly == "fail":
        raise DataValidationError(f"{len(anomalies)} data anomalies (validation.on_anomaly is 'fail'): " + "; ".join(a["message"] for a in anomalies))
    if not anomalies:
        log("example_validator: no anomalies")
    return anomalies


def read_anomalies(anomalies_dir: str | os.PathLike[str]) -> list[dict[str, str]]:
    return read_json(Path(anomalies_dir) / ANOMALIES_FILE)["anomalies"]
