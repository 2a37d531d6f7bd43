"""ExampleValidator: data anomalies that would make training or evaluation misleading.

Each anomaly has a code, the split it concerns and a message. `validation.on_anomaly:
fail` stops the pipeline (before training); `warn` records and prints them.

Codes. Within this run: CLASS_ABSENT_FROM_TRAIN, CLASS_ABSENT_FROM_EVAL, CLASS_DISTRIBUTION_SHIFT
(eval vs train), ALL_MASKS_EMPTY, MIXED_BIT_DEPTH (8- and 16-bit images in one split). Against
the schema (inferred from this run's train split, or an earlier run's: `validation.schema`):
OUT_OF_DOMAIN (channels, bit depth, height, width outside the schema's domains) and
DYNAMIC_RANGE_CHANGED (pixel values above the schema's `pixel_value` maximum). Against an
earlier run's statistics (`validation.baseline_statistics`), split by split: CLASS_DRIFT (train
class frequencies, L-infinity > validation.max_class_shift, or a class that had pixels and has none), IMAGE_SIZE_CHANGED (sizes outside
the baseline's range), BIT_DEPTH_CHANGED, DYNAMIC_RANGE_CHANGED (maximum pixel value changed by
more than a factor of 2, or its 2^k-1 range changed). `baseline_statistics: current` compares
with the statistics the registry's current version was trained on (the Pusher publishes them
with each version): a nightly run whose new data drifted from what serves stops before
training with `validation.on_drift: fail`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from segflow.config.experiment import ExperimentConfig
from segflow.data.examples import ALL_SPLITS, ANOMALIES_FILE
from segflow.utils.io import atomic_dir, read_json, write_json
from segflow.utils.runtime import log


class DataValidationError(RuntimeError):
    """Anomalies found while `validation.on_anomaly` is `fail`."""


def find_anomalies(
    statistics: dict[str, Any], schema: Any, config: ExperimentConfig, baseline: dict[str, Any] | None = None
) -> list[dict[str, str]]:
    """Anomalies of this run's statistics on their own, against the schema (which may be an
    earlier run's), and, given the statistics of an earlier run, against those (drift)."""
    from segflow.components.schema_gen.core import PIXEL_VALUE, int_domains, value_max

    names = config.class_names
    train = statistics["train"]
    splits = [split for split in ALL_SPLITS if split in statistics]
    held_out = [split for split in splits if split != "train"]  # eval and test; a k-fold run has no eval split
    anomalies: list[dict[str, str]] = []

    def add(code: str, split: str, message: str) -> None:
        anomalies.append({"code": code, "split": split, "message": message})

    for index, name in enumerate(names):
        if train["class_pixels"][index] == 0:
            add("CLASS_ABSENT_FROM_TRAIN", "train", f"class {name!r} (id {index}) has no pixel in the train split")
            continue
        for split in held_out:
            if statistics[split]["class_pixels"][index] == 0:
                add(f"CLASS_ABSENT_FROM_{split.upper()}", split, f"class {name!r} (id {index}) has no pixel in the {split} split; its IoU is undefined")
    for split in held_out:
        shift = max(abs(a - b) for a, b in zip(train["class_frequency"], statistics[split]["class_frequency"]))
        if shift > config.validation.max_class_shift:
            add(
                "CLASS_DISTRIBUTION_SHIFT",
                split,
                f"{split} class frequencies differ from train by {shift:.3f} (L-infinity) > validation.max_class_shift {config.validation.max_class_shift}",
            )
    domains = int_domains(schema)
    scale = value_max(schema)
    for split in splits:
        stats = statistics[split]
        if stats["empty_mask_share"] == 1.0:
            add("ALL_MASKS_EMPTY", split, f"every {split} mask is background only")
        if len(stats["bit_depths"]) > 1:
            shares = ", ".join(f"{count} {depth}-bit" for depth, count in sorted(stats["bit_depths"].items(), key=lambda item: int(item[0])))
            add("MIXED_BIT_DEPTH", split, f"{split} mixes bit depths ({shares} images); their pixel values are on different scales")
        for feature, label, values in _domain_values(stats):
            if feature in domains:
                low, high = _bounds(domains[feature])
                outside = sorted({value for value in values if not low <= value <= high})
                if outside:
                    allowed = f"{low if low > -_UNBOUNDED else ''}..{high if high < _UNBOUNDED else ''}"
                    add("OUT_OF_DOMAIN", split, f"{split} has images with {label} {', '.join(map(str, outside))}; the schema's {feature} allows {allowed}")
        if stats.get("max_pixel_value", 0) > scale:
            add(
                "DYNAMIC_RANGE_CHANGED",
                split,
                f"{split} pixel values reach {stats['max_pixel_value']}, above the schema's {PIXEL_VALUE} maximum {scale}; "
                "they would be scaled beyond 1.0",
            )
    if baseline is not None:
        anomalies += drift_anomalies(statistics, baseline, config)
    return anomalies


_UNBOUNDED = 2**63


def _bounds(domain: Any) -> tuple[int, int]:
    return (domain.min if domain.HasField("min") else -_UNBOUNDED, domain.max if domain.HasField("max") else _UNBOUNDED)


def _sizes(stats: dict[str, Any]) -> list[tuple[int, int]]:
    """(height, width) of each image size of a split ("HxW" keys)."""
    return [(int(height), int(width)) for height, width in (size.split("x") for size in stats["image_sizes"])]


def _domain_values(stats: dict[str, Any]) -> list[tuple[str, str, list[int]]]:
    """(schema feature, words for a message, values seen) of one split's statistics."""
    sizes = _sizes(stats)
    return [
        ("channels", "channel count", [int(value) for value in stats["source_channels"]]),
        ("bit_depth", "bit depth", [int(value) for value in stats["bit_depths"]]),
        ("height", "height", [height for height, _ in sizes]),
        ("width", "width", [width for _, width in sizes]),
    ]


def drift_anomalies(statistics: dict[str, Any], baseline: dict[str, Any], config: ExperimentConfig) -> list[dict[str, str]]:
    """This run against an earlier run's statistics, each split against the same split."""
    from segflow.data.preprocessing import effective_value_max

    anomalies: list[dict[str, str]] = []

    def add(code: str, split: str, message: str) -> None:
        anomalies.append({"code": code, "split": split, "message": message})

    before, now = baseline["train"]["class_frequency"], statistics["train"]["class_frequency"]
    if baseline.get("class_names", config.class_names) != config.class_names or len(before) != len(now):
        add("CLASS_DRIFT", "train", f"the baseline run has classes {baseline.get('class_names', len(before))}, this run {config.class_names}")
    else:
        shift = max(abs(a - b) for a, b in zip(now, before))
        gone = [name for name, a, b in zip(config.class_names, now, before) if b > 0 and a == 0]
        if gone:  # however small its share was: the new data cannot teach or test it
            add("CLASS_DRIFT", "train", f"class {', '.join(map(repr, gone))} had pixels in the baseline run's train split and has none now")
        elif shift > config.validation.max_class_shift:
            add(
                "CLASS_DRIFT",
                "train",
                f"train class frequencies differ from the baseline run's by {shift:.3f} (L-infinity) > validation.max_class_shift "
                f"{config.validation.max_class_shift}: " + ", ".join(f"{name} {a:.3f} (was {b:.3f})" for name, a, b in zip(config.class_names, now, before)),
            )
    for split in (split for split in ALL_SPLITS if split in statistics and split in baseline):
        stats, old = statistics[split], baseline[split]
        old_sizes, sizes = _sizes(old), _sizes(stats)
        if old_sizes:
            low = (min(h for h, _ in old_sizes), min(w for _, w in old_sizes))
            high = (max(h for h, _ in old_sizes), max(w for _, w in old_sizes))
            outside = [(h, w) for h, w in sizes if not (low[0] <= h <= high[0] and low[1] <= w <= high[1])]
            if outside:
                add(
                    "IMAGE_SIZE_CHANGED",
                    split,
                    f"{split} has images of {', '.join(f'{h}x{w}' for h, w in sorted(outside))} (height x width), outside the baseline run's "
                    f"{low[0]}x{low[1]}..{high[0]}x{high[1]}",
                )
        depths, old_depths = sorted(stats["bit_depths"], key=int), sorted(old["bit_depths"], key=int)
        if depths != old_depths:
            add("BIT_DEPTH_CHANGED", split, f"{split} images are {'/'.join(depths)}-bit; in the baseline run {'/'.join(old_depths)}-bit")
        if "max_pixel_value" in stats and "max_pixel_value" in old:
            peak, old_peak = stats["max_pixel_value"], old["max_pixel_value"]
            ratio = max(peak, 1) / max(old_peak, 1)
            scale, old_scale = effective_value_max(peak), effective_value_max(old_peak)
            if ratio > 2 or ratio < 0.5 or scale != old_scale:
                add(
                    "DYNAMIC_RANGE_CHANGED",
                    split,
                    f"{split} maximum pixel value {peak} ({scale.bit_length()}-bit range) vs {old_peak} ({old_scale.bit_length()}-bit range) "
                    "in the baseline run",
                )
    return anomalies


def run(
    config: ExperimentConfig,
    statistics_dir: str | os.PathLike[str],
    schema_dir: str | os.PathLike[str],
    anomalies_dir: str | os.PathLike[str],
) -> list[dict[str, str]]:
    from segflow.components.schema_gen.core import read_schema
    from segflow.data.examples import read_statistics

    statistics = read_statistics(statistics_dir)
    baseline, against = baseline_statistics(config)
    own = find_anomalies(statistics, read_schema(schema_dir), config)
    drift = [{**anomaly, "message": f"{anomaly['message']} ({against})"} for anomaly in drift_anomalies(statistics, baseline, config)] if baseline else []
    anomalies = own + drift
    with atomic_dir(anomalies_dir) as out:
        write_json(out / ANOMALIES_FILE, {"count": len(anomalies), "anomalies": anomalies})
    for anomaly in anomalies:
        log(f"example_validator: {anomaly['code']} ({anomaly['split']}): {anomaly['message']}")
    on_drift = config.validation.on_drift or config.validation.on_anomaly
    stopping = [*(own if config.validation.on_anomaly == "fail" else []), *(drift if on_drift == "fail" else [])]
    if stopping:
        settings = " and ".join(
            setting for setting, found in (("validation.on_anomaly", own and config.validation.on_anomaly == "fail"), ("validation.on_drift", drift and on_drift == "fail")) if found
        )
        raise DataValidationError(f"{len(stopping)} data anomalies ({settings}: fail): " + "; ".join(f"{a['code']} ({a['split']}): {a['message']}" for a in stopping))
    if not anomalies:
        log("example_validator: no anomalies")
    return anomalies


def baseline_statistics(config: ExperimentConfig) -> tuple[dict[str, Any] | None, str]:
    """The statistics to check drift against, and words for where they come from: a file or
    folder, or (`current`) the registry's current version's; (None, reason) when there are none."""
    from segflow.config.component_config import REGISTRY_CURRENT
    from segflow.data.examples import STATISTICS_FILE, read_statistics
    from segflow.export.model_registry import read_aliases, version_location
    from segflow.utils.storage import join, localized

    location = config.validation.baseline_statistics
    if not location:
        return None, "no baseline statistics"
    if location != REGISTRY_CURRENT:
        log(f"example_validator: comparing with the baseline statistics {location}")
        return read_statistics(location), f"against {location}"
    registry, name = config.push.registry, config.name
    version = read_aliases(registry, name).current
    if version is None:
        log(f"example_validator: baseline_statistics: current: no current version of {name!r} in {registry} yet; no drift check")
        return None, "no current version"
    with localized(join(version_location(registry, name, version), STATISTICS_FILE)) as local:
        if not os.path.exists(local):
            raise FileNotFoundError(f"validation.baseline_statistics: current: version {version} of {name!r} has no {STATISTICS_FILE} (pushed before they were published)")
        log(f"example_validator: comparing with the statistics of version {version} of {name!r}, the current one")
        return read_statistics(local), f"against version {version}, the current one"


def read_anomalies(anomalies_dir: str | os.PathLike[str]) -> list[dict[str, str]]:
    return read_json(Path(anomalies_dir) / ANOMALIES_FILE)["anomalies"]
