"""Config validation: the user contract of DESIGN.md and clear key-path errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from segflow.cli import main
from segflow.config.component_config import resolve_locations
from segflow.config.experiment import apply_override, config_schema, load_config, validate_config
from segflow.model.losses import parse_loss
from segflow.utils.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def minimal(**extra: object) -> dict:
    return {"name": "x", "dataset": {"images": "i", "masks": "m"}, **extra}


def test_design_contract_example_validates() -> None:
    # DESIGN.md's example also sets `ignore_index: 255`, which with these mask_values would
    # erase the foreground class; that pairing is rejected (test_ignore_index_in_mask_values_is_an_error).
    raw = yaml.safe_load(
        """
name: isbi-unet
dataset: {images: path/to/images, masks: path/to/masks, eval_split: 0.2}
classes: 2
mask_values: [0, 255]
shape: [256, 256, 1]
architecture: unet
backbone: simple
augmentation: {HorizontalFlip: {p: 0.5}}
loss: crossentropy+dice
batch: 8
stages:
  - epochs: 10
export: [saved_model, tflite_int8]
"""
    )
    config = validate_config(raw)
    assert config.num_labels == 2 and config.shape == [256, 256, 1] and config.total_epochs == 10
    assert not config.sigmoid_head


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    load_config(path)


SCHEMA_FILE = REPO / "configs" / "segflow.schema.json"


def test_the_checked_in_schema_is_segflow_schemas_output() -> None:
    """configs/segflow.schema.json is what `segflow schema` prints (SEGFLOW_UPDATE_GOLDEN=1 rewrites it)."""
    current = json.dumps(config_schema(), indent=2) + "\n"
    if os.environ.get("SEGFLOW_UPDATE_GOLDEN"):
        SCHEMA_FILE.write_text(current)
    assert SCHEMA_FILE.read_text() == current, "the config models changed: run `make golden` to rewrite configs/segflow.schema.json"


def test_segflow_schema_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == config_schema()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate_against_the_schema_and_point_editors_at_it(path: Path) -> None:
    assert path.read_text().splitlines()[0] == "# yaml-language-server: $schema=segflow.schema.json"
    errors = [f"{'.'.join(map(str, error.path))}: {error.message}" for error in jsonschema.Draft202012Validator(config_schema()).iter_errors(yaml.safe_load(path.read_text()))]
    assert not errors


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (minimal(epochz=3), []),
        (minimal(model={"dpeth": 3}), ["model"]),
        (minimal(batch=0), ["batch"]),
        (minimal(export="saved_model"), ["export"]),
        (minimal(normalization="zscore"), ["normalization"]),
    ],
)
def test_the_schema_refuses_what_the_config_refuses(raw: dict, path: list[str]) -> None:
    with pytest.raises(ConfigError):
        validate_config(raw)
    errors = list(jsonschema.Draft202012Validator(config_schema()).iter_errors(raw))
    assert [list(error.path) for error in errors] == [path]


def test_the_schema_takes_the_shorthand_sections() -> None:
    raw = minimal(export=["saved_model"], normalization="minmax")
    validate_config(raw)
    assert not list(jsonschema.Draft202012Validator(config_schema()).iter_errors(raw))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (minimal(model={"dpeth": 3}), "model.dpeth: unknown key"),
        (minimal(batch="eight"), "batch:"),
        (minimal(stages=[{"epochs": 0}]), "stages.0.epochs:"),
        (minimal(loss="crossentropy+0.5*dise"), "unknown loss 'dise'"),
        (minimal(architecture="segformer"), "unknown architecture 'segformer'"),
        (minimal(augmentation={"Flip": {}}), "unknown augmentation 'Flip'"),
        (minimal(augmentation={"VerticalFlip": {"prob": 1}}), "augmentation.VerticalFlip"),
        (minimal(export=["onnx_magic"]), "unknown export format"),
        (minimal(classes=3, mask_values=[0, 255]), "mask_values has 2 values but there are 3"),
        (minimal(classes=3, ignore_index=1), "collides with a class id"),
        (minimal(shape=[64, 64, 2]), "shape:"),
        ({"dataset": {"images": "i", "masks": "m"}}, "name: Field required"),
    ],
)
def test_invalid_configs_name_the_key(raw: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate_config(raw)
    assert expected in str(error.value)


def test_single_class_means_sigmoid_head_with_background() -> None:
    config = validate_config(minimal(classes=["cell"]))
    assert config.sigmoid_head and config.class_names == ["background", "cell"] and config.num_labels == 2


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal(stages=[{"epochs": 3}])))
    config = load_config(path, ["stages.0.epochs=7", "model.depth=2", "export=[saved_model]", "dataset.eval_split=0.5"])
    assert config.stages[0].epochs == 7 and config.model.depth == 2 and config.export.formats == ["saved_model"]
    assert config.dataset.eval_split == 0.5


def test_override_errors() -> None:
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_override({}, "epochs")
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_override({"batch": 8}, "batch.size=2")


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_json_round_trip_and_absolute_paths(tmp_path: Path) -> None:
    config = validate_config(minimal(classes=["a", "b", "c"]))
    assert type(config).from_json(config.to_json()) == config
    absolute = resolve_locations(config, tmp_path)
    assert absolute.dataset.images == str(tmp_path / "i") and Path(absolute.push.registry).is_absolute()


def test_parse_loss_weights() -> None:
    assert [(term.weight, term.name) for term in parse_loss("crossentropy+0.5*dice")] == [(1.0, "crossentropy"), (0.5, "dice")]
    with pytest.raises(ValueError, match="cannot parse"):
        parse_loss("crossentropy+*dice")


def test_ignore_index_in_mask_values_is_an_error() -> None:
    """Before: validated, and label_lookup mapped raw 255 to 'ignored', erasing class 1."""
    raw = minimal(classes=2, mask_values=[0, 255], ignore_index=255)
    with pytest.raises(ConfigError, match=r"ignore_index 255 is also in mask_values \[0, 255\].*class 1 \('1'\).*skipped by losses"):
        validate_config(raw)


def test_void_value_outside_mask_values_is_fine() -> None:
    config = validate_config(minimal(classes=2, mask_values=[0, 128], ignore_index=255))
    assert config.ignore_index == 255


def test_group_by_must_be_a_regex() -> None:
    with pytest.raises(ConfigError, match="dataset.group_by: .*not a valid regular expression"):
        validate_config(minimal(dataset={"images": "i", "masks": "m", "group_by": "("}))


@pytest.mark.parametrize("location", ["s3://bucket/images", "gs://bucket/a/b"])
def test_uris_are_not_turned_into_local_paths(location: str, tmp_path: Path) -> None:
    config = validate_config(minimal(dataset={"images": location, "masks": location}, push={"registry": location}))
    resolved = resolve_locations(config, tmp_path)
    assert resolved.dataset.images == location and resolved.push.registry == location


def test_relative_paths_become_absolute(tmp_path: Path) -> None:
    resolved = resolve_locations(validate_config(minimal()), tmp_path)
    assert resolved.dataset.images == str(tmp_path / "i") and resolved.push.registry == str(tmp_path / "model-registry")


def test_validation_schema_key_round_trips() -> None:
    config = validate_config(minimal(validation={"schema": "runs/a/schema_gen/schema"}))
    assert config.validation.schema_path == "runs/a/schema_gen/schema"
    assert type(config).from_json(config.to_json()) == config
    assert "schema: runs/a/schema_gen/schema" in config.to_yaml()
