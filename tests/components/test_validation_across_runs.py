"""Validation across runs: a schema and statistics of an earlier run catch drift (bit depth,
dynamic range, image size, class balance) that a schema inferred from the same run cannot."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from segflow.components.example_gen import core as example_gen
from segflow.components.example_validator import core as example_validator
from segflow.components.schema_gen import core as schema_gen
from segflow.components.statistics_gen import core as statistics_gen
from segflow.config.experiment import ExperimentConfig, validate_config
from segflow.data.demo_data import CLASS_NAMES
from segflow.data.examples import SegmentationExample, serialize
from segflow.utils.io import encode_png
from tests.conftest import tiny_raw_config
from segflow.data.examples import read_statistics
from segflow.data.preprocessing import effective_value_max

DRIFT_CODES = {"BIT_DEPTH_CHANGED", "DYNAMIC_RANGE_CHANGED", "IMAGE_SIZE_CHANGED", "CLASS_DRIFT", "OUT_OF_DOMAIN", "MIXED_BIT_DEPTH"}


def _split(count: int = 10, sizes: dict[str, int] | None = None, depths: dict[str, int] | None = None, peak: int = 250, frequency: tuple[float, ...] = (0.7, 0.1, 0.1, 0.1)) -> dict[str, Any]:
    pixels = [int(share * 10000) for share in frequency]
    return {
        "count": count,
        "image_sizes": sizes or {"32x32": count},
        "source_channels": {"3": count},
        "bit_depths": depths or {"8": count},
        "channel_mean": [0.5, 0.5, 0.5],
        "channel_std": [0.2, 0.2, 0.2],
        "class_pixels": pixels,
        "class_frequency": list(frequency),
        "ignored_pixel_share": 0.0,
        "empty_mask_share": 0.0,
        "max_pixel_value": peak,
        "channel_raw_min": [0, 0, 0],
        "channel_raw_max": [peak, peak, peak],
    }


def _statistics(**train: Any) -> dict[str, Any]:
    return {"class_names": list(CLASS_NAMES), "train": _split(**train), "eval": _split(count=4, **train)}


@pytest.fixture
def config(tmp_path: Path) -> ExperimentConfig:
    return validate_config(tiny_raw_config(tmp_path))


def _codes(anomalies: list[dict[str, str]]) -> set[str]:
    return {anomaly["code"] for anomaly in anomalies}


def test_value_max_is_the_train_maximum_rounded_up_to_a_bit_range() -> None:
    assert [effective_value_max(value) for value in (0, 200, 255)] == [255, 255, 255]  # 8-bit (also in 16-bit files)
    assert [effective_value_max(value) for value in (256, 1023, 3000, 4095)] == [511, 1023, 4095, 4095]  # 12-bit camera: 4095
    assert effective_value_max(65535) == 65535


def test_schema_records_the_pixel_value_domain_and_readers_get_the_scale(tmp_path: Path, config: ExperimentConfig) -> None:
    statistics = _statistics(depths={"16": 10}, peak=3000)
    schema = schema_gen.infer_schema(statistics, config)
    pixel = next(feature for feature in schema.feature if feature.name == "pixel_value")
    assert (pixel.int_domain.min, pixel.int_domain.max) == (0, 4095)
    assert schema_gen.value_max(schema) == 4095
    statistics_gen.write_json(tmp_path / "statistics" / "statistics.json", statistics)
    schema_gen.run(config, tmp_path / "statistics", tmp_path / "schema")
    assert schema_gen.read_value_max(tmp_path / "schema") == 4095
    assert schema_gen.read_value_max(tmp_path / "schema" / "schema.pbtxt") == 4095
    del schema.feature[[feature.name for feature in schema.feature].index("pixel_value")]
    assert schema_gen.value_max(schema) == 65535  # a schema from before pixel_value: its bit depth's range


def test_schema_checks_bit_depth_and_pixel_values(config: ExperimentConfig) -> None:
    schema = schema_gen.infer_schema(_statistics(), config)  # 8-bit, values up to 250: scale 255
    assert example_validator.find_anomalies(_statistics(), schema, config) == []
    found = example_validator.find_anomalies(_statistics(depths={"16": 10}, peak=60000), schema, config)
    assert _codes(found) == {"OUT_OF_DOMAIN", "DYNAMIC_RANGE_CHANGED"}
    assert any("bit depth 16" in anomaly["message"] and "8..8" in anomaly["message"] for anomaly in found)
    sized = schema_gen.infer_schema(_statistics(), config)
    for feature in sized.feature:
        if feature.name in ("height", "width"):
            feature.int_domain.max = 32
    assert _codes(example_validator.find_anomalies(_statistics(sizes={"64x32": 10}), sized, config)) == {"OUT_OF_DOMAIN"}


def test_a_split_that_mixes_8_and_16_bit_images_is_flagged(config: ExperimentConfig) -> None:
    schema = schema_gen.infer_schema(_statistics(depths={"8": 6, "16": 4}, peak=65535), config)
    found = example_validator.find_anomalies(_statistics(depths={"8": 6, "16": 4}, peak=65535), schema, config)
    assert _codes(found) == {"MIXED_BIT_DEPTH"} and {anomaly["split"] for anomaly in found} == {"train", "eval"}
    assert "6 8-bit, 4 16-bit" in found[0]["message"]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, set()),
        ({"frequency": (0.6, 0.15, 0.15, 0.1)}, set()),  # shift 0.1 <= max_class_shift 0.15
        ({"frequency": (0.4, 0.4, 0.1, 0.1)}, {"CLASS_DRIFT"}),
        ({"sizes": {"48x48": 10}}, {"IMAGE_SIZE_CHANGED"}),
        ({"depths": {"16": 10}}, {"BIT_DEPTH_CHANGED"}),  # 8-bit values in 16-bit files: same range
        ({"peak": 140}, set()),  # darker, within a factor of 2, same 8-bit range
        ({"peak": 120}, {"DYNAMIC_RANGE_CHANGED"}),  # more than a factor of 2 darker
        ({"depths": {"16": 10}, "peak": 4000}, {"BIT_DEPTH_CHANGED", "DYNAMIC_RANGE_CHANGED"}),  # a 12-bit camera
    ],
)
def test_drift_against_baseline_statistics(changes: dict[str, Any], expected: set[str], config: ExperimentConfig) -> None:
    found = example_validator.drift_anomalies(_statistics(**changes), _statistics(), config)
    assert _codes(found) == expected


def test_drift_thresholds_beyond_factor_and_range() -> None:
    config = validate_config(tiny_raw_config(Path("/data")))
    baseline = _statistics(depths={"16": 10}, peak=3000)  # 12-bit range
    assert _codes(example_validator.drift_anomalies(_statistics(depths={"16": 10}, peak=5000), baseline, config)) == {"DYNAMIC_RANGE_CHANGED"}
    assert example_validator.drift_anomalies(_statistics(depths={"16": 10}, peak=3500), baseline, config) == []
    varied = _statistics(sizes={"32x32": 5, "64x48": 5})
    assert example_validator.drift_anomalies(_statistics(sizes={"40x40": 10}), varied, config) == []  # inside the earlier range
    older = _statistics()
    for split in ("train", "eval"):
        del older[split]["max_pixel_value"]  # statistics of a run before max_pixel_value existed
    assert example_validator.drift_anomalies(_statistics(peak=60), older, config) == []
    renamed = {**_statistics(), "class_names": ["background", "x"]}
    assert "classes" in example_validator.drift_anomalies(_statistics(), renamed, config)[0]["message"]


def test_given_schema_and_baseline_errors_name_the_file(tmp_path: Path, config: ExperimentConfig) -> None:
    def with_schema(location: Path) -> ExperimentConfig:
        return validate_config(tiny_raw_config(tmp_path, validation={"schema": str(location)}))

    with pytest.raises(FileNotFoundError, match=r"nowhere/schema.pbtxt: no such schema file"):
        schema_gen.run(with_schema(tmp_path / "nowhere" / "schema.pbtxt"), tmp_path, tmp_path / "schema")
    (tmp_path / "bad.pbtxt").write_text("feature { name: ")
    with pytest.raises(ValueError, match=r"bad.pbtxt: not a tensorflow_metadata Schema"):
        schema_gen.run(with_schema(tmp_path / "bad.pbtxt"), tmp_path, tmp_path / "schema")
    (tmp_path / "other.pbtxt").write_text('feature { name: "x" type: INT }')
    with pytest.raises(ValueError, match=r"other.pbtxt: not a segflow schema \(no feature image, mask, channels, bit_depth\)"):
        schema_gen.run(with_schema(tmp_path / "other.pbtxt"), tmp_path, tmp_path / "schema")
    two_classes = validate_config(tiny_raw_config(tmp_path, classes=2))
    (tmp_path / "two.pbtxt").write_text(schema_gen.text_format.MessageToString(schema_gen.infer_schema(_statistics(frequency=(0.5, 0.5)), two_classes)))
    with pytest.raises(ValueError, match=r"two.pbtxt: the schema is for 2 classes but the config has 4"):
        schema_gen.run(with_schema(tmp_path / "two.pbtxt"), tmp_path, tmp_path / "schema")
    with pytest.raises(FileNotFoundError, match=r"old/statistics.json: no such statistics file"):
        read_statistics(tmp_path / "old" / "statistics.json")
    (tmp_path / "notes.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"notes.json: not a segflow statistics file"):
        read_statistics(tmp_path / "notes.json")


def test_statistics_record_the_raw_value_range_per_channel(config: ExperimentConfig) -> None:
    combine = statistics_gen.SplitStatisticsFn(config.num_labels, 3, None)
    grey = np.full((4, 4, 1), 7, np.uint16)
    grey[0, 0] = 4000
    colour = np.zeros((4, 4, 3), np.uint16)
    colour[..., 0], colour[..., 1], colour[..., 2] = 10, 20, 3000
    mask = np.zeros((4, 4), np.uint8)
    first = combine.add_input(combine.create_accumulator(), serialize(SegmentationExample("g.png", grey, mask)))
    second = combine.add_input(combine.create_accumulator(), serialize(SegmentationExample("c.png", colour, mask)))
    statistics = combine.extract_output(combine.merge_accumulators([first, second]))
    assert statistics["max_pixel_value"] == 4000
    assert statistics["channel_raw_min"] == [7, 20, 3000] and statistics["channel_raw_max"] == [4000, 20, 3000]


# Integration: ExampleGen, StatisticsGen, SchemaGen and ExampleValidator cores, twice.


def _run(config: ExperimentConfig, root: Path) -> list[dict[str, str]]:
    example_gen.run(config, root / "examples")
    statistics_gen.run(config, root / "examples", root / "statistics")
    schema_gen.run(config, root / "statistics", root / "schema")
    return example_validator.run(config, root / "statistics", root / "schema", root / "anomalies")


def _rewrite(source: Path, target: Path, image_fn: Any, mask_fn: Any) -> Path:
    """A copy of a dataset with every image and mask passed through a function."""
    shutil.copytree(source, target)
    for folder, change in (("images", image_fn), ("masks", mask_fn)):
        for path in sorted((target / folder).glob("*.png")):
            picture = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            path.write_bytes(encode_png(change(picture)))
    return target


@pytest.fixture(scope="module")
def first_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 8-bit tiny dataset, validated as before (schema inferred from its own train split)."""
    root = tmp_path_factory.mktemp("first_run")
    assert not _codes(_run(validate_config(tiny_raw_config(tiny_data)), root)) & DRIFT_CODES
    return root


def _against(first_run: Path, data: Path, **validation: Any) -> ExperimentConfig:
    return validate_config(
        tiny_raw_config(data, validation={"schema": str(first_run / "schema"), "baseline_statistics": str(first_run / "statistics"), **validation})
    )


def test_a_16_bit_version_is_caught_only_against_the_earlier_run(first_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    data = _rewrite(tiny_data, tmp_path / "data16", lambda image: image.astype(np.uint16) * 257, lambda mask: mask)
    found = _run(_against(first_run, data), tmp_path / "second")
    assert _codes(found) & DRIFT_CODES == {"BIT_DEPTH_CHANGED", "DYNAMIC_RANGE_CHANGED", "OUT_OF_DOMAIN"}
    assert {anomaly["split"] for anomaly in found if anomaly["code"] == "BIT_DEPTH_CHANGED"} == {"train", "eval"}
    # the schema of the first run was used, not inferred again: its value scale stays 8-bit
    assert schema_gen.read_schema(tmp_path / "second" / "schema") == schema_gen.read_schema(first_run / "schema")
    assert schema_gen.read_value_max(first_run / "schema") == 255
    first, second = read_statistics(first_run / "statistics"), read_statistics(tmp_path / "second" / "statistics")
    assert second["train"]["max_pixel_value"] == first["train"]["max_pixel_value"] * 257
    assert len(second["train"]["channel_raw_max"]) == 3
    # the old path, a schema inferred from the same run and no baseline, sees nothing wrong
    alone = _run(validate_config(tiny_raw_config(data)), tmp_path / "alone")
    assert not _codes(alone) & DRIFT_CODES
    assert schema_gen.read_value_max(tmp_path / "alone" / "schema") == 65535


def test_new_sizes_and_class_balance_are_drift_and_fail_when_asked(first_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    def bigger(picture: np.ndarray) -> np.ndarray:
        return cv2.resize(picture, (48, 48), interpolation=cv2.INTER_NEAREST)

    def more_of_class_1(mask: np.ndarray) -> np.ndarray:
        mask = bigger(mask)
        mask[4:44, 4:44] = 1
        return mask

    data = _rewrite(tiny_data, tmp_path / "data", bigger, more_of_class_1)
    with pytest.raises(example_validator.DataValidationError, match="CLASS|baseline"):
        _run(_against(first_run, data, on_anomaly="fail"), tmp_path / "second")
    found = example_validator.read_anomalies(tmp_path / "second" / "anomalies")
    assert _codes(found) & DRIFT_CODES == {"CLASS_DRIFT", "IMAGE_SIZE_CHANGED"}
    assert any("48x48" in anomaly["message"] for anomaly in found)


def test_drift_against_the_registrys_current_version_stops_the_run_with_on_drift_fail(first_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    """`baseline_statistics: current`: the statistics the current version was trained on (the
    Pusher publishes them with it). A class that vanished (a 5% share: below max_class_shift) is
    drift; on_drift: fail stops the run and names each anomaly and the version; on_anomaly stays warn."""
    from segflow.components.pusher import core as pusher
    from segflow.export.exporters import EXPORTS_FILE
    from segflow.utils.io import write_json
    from tests.conftest import pusher_inputs

    store = str(tmp_path / "registry")
    current = validate_config(tiny_raw_config(tiny_data, push={"registry": store}, validation={"baseline_statistics": "current", "on_drift": "fail"}))
    assert example_validator.baseline_statistics(current) == (None, "no current version")  # the first night: nothing to compare with
    inputs = pusher_inputs(tmp_path / "push_inputs")
    shutil.copytree(first_run / "statistics", inputs["statistics_dir"], dirs_exist_ok=True)
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "model.tflite").write_bytes(b"tflite")
    write_json(exports / EXPORTS_FILE, {"tflite_fp32": {"file": "model.tflite", "status": "passed"}})
    assert pusher.run(current, exports, push_dir=tmp_path / "push", **inputs)["current"]

    same = _run(current, tmp_path / "same")  # the data the version was trained on: no drift
    assert not _codes(same) & DRIFT_CODES

    def no_rectangles(mask: np.ndarray) -> np.ndarray:
        return np.where(mask == CLASS_NAMES.index("rectangle"), 0, mask).astype(mask.dtype)

    drifted = _rewrite(tiny_data, tmp_path / "drifted", lambda image: image, no_rectangles)
    config = validate_config(tiny_raw_config(drifted, push={"registry": store}, validation={"baseline_statistics": "current", "on_drift": "fail"}))
    with pytest.raises(example_validator.DataValidationError) as stopped:
        _run(config, tmp_path / "second")
    message = str(stopped.value)
    assert "(validation.on_drift: fail)" in message and "against version 1, the current one" in message
    assert "CLASS_DRIFT (train): class 'rectangle' had pixels in the baseline run's train split and has none now" in message
    assert "CLASS_ABSENT_FROM_TRAIN" not in message  # on_anomaly is warn: recorded, not a reason to stop
    assert {"CLASS_DRIFT", "CLASS_ABSENT_FROM_TRAIN"} <= _codes(example_validator.read_anomalies(tmp_path / "second" / "anomalies"))
    warned = validate_config(tiny_raw_config(drifted, push={"registry": store}, validation={"baseline_statistics": "current", "on_drift": "warn"}))
    assert "CLASS_DRIFT" in _codes(_run(warned, tmp_path / "third"))
