"""ExampleGen, StatisticsGen, SchemaGen and ExampleValidator on small synthetic folders,
run for real with the Beam DirectRunner."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
import tifffile

from segflow.components.example_gen import core as example_gen
from segflow.components.example_validator import core as example_validator
from segflow.components.schema_gen import core as schema_gen
from segflow.components.statistics_gen import core as statistics_gen
from segflow.config.experiment import ExperimentConfig, validate_config
from segflow.data.examples import assign_splits, iter_split
from segflow.utils.io import encode_png


def _quarantine(examples: Path) -> dict[str, str]:
    entries = [json.loads(line) for line in (examples / "quarantine.jsonl").read_text().splitlines()]
    return {Path(entry["file"]).name: entry["reason"] for entry in entries}


def test_done_when_three_bad_inputs_are_quarantined_and_the_rest_written(
    tiny_data: Path, tmp_path: Path, make_config: Callable[..., ExperimentConfig]
) -> None:
    """The issue's scenario: one corrupt PNG, one image without a mask, one mask with an
    unexpected value. Run with Beam multi-processing, the mode the other tests skip."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "images" / "000.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a PNG")
    (data / "masks" / "001.png").unlink()
    bad_mask = cv2.imread(str(data / "masks" / "002.png"), cv2.IMREAD_UNCHANGED)
    bad_mask[0, 0] = 9
    (data / "masks" / "002.png").write_bytes(encode_png(bad_mask))
    config = make_config(dataset={"images": str(data / "images"), "masks": str(data / "masks"), "eval_split": 0.25}, beam={"running_mode": "multi_processing"})
    counts = example_gen.run(config, tmp_path / "examples")
    reasons = _quarantine(tmp_path / "examples")
    assert set(reasons) == {"000.png", "001.png", "002.png"}
    assert "not a decodable image" in reasons["000.png"]
    assert "no mask" in reasons["001.png"]
    assert "mask values 9" in reasons["002.png"]
    assert counts["examples_in"] == 20 and counts["quarantined"] == 3 and counts["examples_written"] == 17
    assert counts["examples_in"] == counts["examples_written"] + counts["quarantined"]
    written = {example.filename for split in ("train", "eval") for example in iter_split(tmp_path / "examples", split)}
    assert len(written) == 17 and not written & {"000.png", "001.png", "002.png"}


def test_formats_bit_depths_mask_values_and_more_quarantine_reasons(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    for index in range(8):  # 16-bit TIFFs, masks as 0/255 PNGs
        tifffile.imwrite(images / f"t{index}.tif", rng.integers(0, 65535, (16, 16)).astype(np.uint16))
        (masks / f"t{index}.png").write_bytes(encode_png(mask))
    for index in range(4):  # 8-bit RGB JPEGs, masks as TIFF
        cv2.imwrite(str(images / f"j{index}.jpg"), rng.integers(0, 255, (16, 16, 3)).astype(np.uint8))
        tifffile.imwrite(masks / f"j{index}.tif", mask)
    cv2.imwrite(str(images / "small.png"), np.zeros((8, 8), np.uint8))
    (masks / "small.png").write_bytes(encode_png(mask))
    (masks / "orphan.png").write_bytes(encode_png(mask))
    (images / "notes.txt").write_text("not an image")
    config = validate_config(
        {"name": "formats", "dataset": {"images": str(images), "masks": str(masks), "eval_split": 0.3}, "classes": 2, "mask_values": [0, 255], "shape": [16, 16, 1], "beam": {"running_mode": "in_memory"}}
    )
    counts = example_gen.run(config, tmp_path / "examples")
    reasons = _quarantine(tmp_path / "examples")
    assert set(reasons) == {"small.png", "orphan.png", "notes.txt"}
    assert "is 8x8 but mask" in reasons["small.png"] and "no image" in reasons["orphan.png"] and "unsupported file type" in reasons["notes.txt"]
    assert counts == {"examples_in": 15, "examples_written": 12, "quarantined": 3, "skipped": 0, "train_examples": counts["train_examples"], "eval_examples": counts["eval_examples"]}
    examples = {e.filename: e for split in ("train", "eval") for e in iter_split(tmp_path / "examples", split)}
    assert examples["t0.tif"].image.dtype == np.uint16 and examples["t0.tif"].bit_depth == 16
    assert examples["j0.jpg"].image.shape == (16, 16, 3)
    assert set(np.unique(examples["t0.tif"].mask)) == {0, 1}  # 255 mapped to class id 1


def test_split_is_a_deterministic_hash_of_the_name() -> None:
    stems = [f"f{i}" for i in range(2000)]
    assert assign_splits(stems, 0.2) == assign_splits(list(reversed(stems)), 0.2)
    assert np.mean([split == "eval" for split in assign_splits(stems, 0.2).values()]) == 0.2


def test_no_usable_example_is_a_clear_error(tmp_path: Path, make_config: Callable[..., ExperimentConfig]) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"broken")
    (tmp_path / "masks" / "a.png").write_bytes(b"broken")
    config = make_config(dataset={"images": str(tmp_path / "images"), "masks": str(tmp_path / "masks")})
    with pytest.raises(example_gen.NoUsableExamplesError, match="no usable example"):
        example_gen.run(config, tmp_path / "examples")
    assert not (tmp_path / "examples").exists()  # nothing half-written for a later step


def test_missing_folder_is_named(tmp_path: Path, make_config: Callable[..., ExperimentConfig]) -> None:
    config = make_config(dataset={"images": str(tmp_path / "nope"), "masks": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="nope: not a folder"):
        example_gen.run(config, tmp_path / "examples")


def test_statistics_schema_and_anomalies(trained: dict, tmp_path: Path) -> None:
    from tensorflow_metadata.proto.v0 import statistics_pb2

    config: ExperimentConfig = trained["config"]
    statistics = statistics_gen.run(config, trained["examples"], tmp_path / "statistics")
    train = statistics["train"]
    assert train["count"] + statistics["eval"]["count"] == 20
    assert train["image_sizes"] == {"32x32": train["count"]}
    assert sum(train["class_frequency"]) == pytest.approx(1.0)
    assert all(0.0 < value < 1.0 for value in train["channel_mean"]) and len(train["channel_std"]) == 3
    proto = statistics_pb2.DatasetFeatureStatisticsList.FromString((tmp_path / "statistics" / "Split-train" / "FeatureStats.pb").read_bytes())
    assert proto.datasets[0].num_examples == train["count"]
    schema_gen.run(config, tmp_path / "statistics", tmp_path / "schema")
    schema = schema_gen.read_schema(tmp_path / "schema")
    assert {feature.name for feature in schema.feature} >= {"image", "mask", "height", "width", "channels"}
    anomalies = example_validator.run(config, tmp_path / "statistics", tmp_path / "schema", tmp_path / "anomalies")
    assert isinstance(anomalies, list)


def test_validator_flags_and_fails_on_anomalies(trained: dict, tmp_path: Path) -> None:
    config: ExperimentConfig = trained["config"]
    statistics = statistics_gen.run(config, trained["examples"], tmp_path / "statistics")
    schema_gen.run(config, tmp_path / "statistics", tmp_path / "schema")
    statistics["train"]["class_pixels"][3] = 0
    statistics["eval"]["class_frequency"] = [1.0, 0.0, 0.0, 0.0]
    found = example_validator.find_anomalies(statistics, schema_gen.read_schema(tmp_path / "schema"), config)
    assert {"CLASS_ABSENT_FROM_TRAIN", "CLASS_DISTRIBUTION_SHIFT"} <= {a["code"] for a in found}
    strict = config.model_copy(update={"validation": config.validation.model_copy(update={"on_anomaly": "fail", "max_class_shift": 0.0001})})
    with pytest.raises(example_validator.DataValidationError, match="CLASS|differ"):
        example_validator.run(strict, tmp_path / "statistics", tmp_path / "schema", tmp_path / "anomalies")
