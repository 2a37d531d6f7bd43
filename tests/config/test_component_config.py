"""Config slices (each component's cache key holds only the keys its core reads), the guard
that keeps the slice table in step with the cores, and the dataset fingerprint."""
from __future__ import annotations

import ast
import inspect
import json
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from segflow.config.component_config import COMPONENT_KEYS, COMPONENT_LOCATIONS, LOCATION_PARAMETERS, config_from_slice, config_slice, locations, resolve_locations
from segflow.components.dataset_fingerprint import core as fingerprint_core
from segflow.config.experiment import ExperimentConfig, validate_config

COMPONENTS_DIR = Path(__file__).resolve().parents[2] / "segflow" / "components"
TRAIN_DIR = Path(__file__).resolve().parents[2] / "segflow" / "train"
# Library modules a core is orchestration over: their config reads are the core's, and the config
# they hand each other stays inside what the guard reads (a module missing here shows up as the
# whole config going outside). The trainer's pieces moved out of its core.py into these.
CORE_MODULES = {
    "trainer": tuple(
        TRAIN_DIR / f"{name}.py"
        for name in ("input_pipeline", "hard_negatives", "network", "stages", "robustness", "progress", "qat_fine_tune", "multiworker", "lr_sweep", "warm_start")
    ),
}
# Methods a core may call on the config. `to_json` hands the whole config to a child process
# that runs functions of the same core.py, whose reads this guard sees too; `model_copy` makes a
# changed copy (warm_start: resolved initial_weights) that stays in the same guarded code.
CONFIG_METHODS = {"to_json", "model_copy"}


def rich_raw() -> dict[str, Any]:
    """A config with a value other than the default for every key a slice can hold."""
    return {
        "name": "rich",
        "dataset": {"images": "/data/images", "masks": "/data/masks", "eval_split": 0.3, "group_by": r"^(\w+)_", "multipage": "expand"},
        "classes": ["background", "cell", "membrane"],
        "ignore_index": 255,
        "mask_values": [0, 128, 200],
        "shape": [48, 64, 1],
        "architecture": "unet",
        "backbone": "simple",
        "model": {"depth": 3, "base_filters": 16, "dropout": 0.1},
        "normalization": "minmax",
        "augmentation": {"VerticalFlip": {"p": 0.3}, "HorizontalFlip": {"p": 0.5}},  # not RandomRotate90: the shape is not square
        "loss": "crossentropy+0.5*dice",
        "batch": 3,
        "stages": [{"epochs": 4, "learning_rate": 0.01}, {"epochs": 2, "learning_rate": 0.001}],
        "export": ["saved_model", "tflite_fp16"],
        "seed": 7,
        "deterministic": True,
        "beam": {"running_mode": "in_memory", "num_workers": 2},
        "validation": {"on_anomaly": "fail", "max_class_shift": 0.3, "schema": "/runs/old/schema", "baseline_statistics": "/runs/old/statistics"},
        "evaluation": {"min_mean_iou": 0.4},
        "push": {"registry": "/registry"},
    }


def _get(raw: Any, key: str) -> Any:
    for part in key.split("."):
        raw = raw[part]
    return raw


def _dump(config: ExperimentConfig) -> dict[str, Any]:
    return config.model_dump(mode="json", by_alias=True)


@pytest.mark.parametrize("component", sorted(COMPONENT_KEYS))
def test_slice_round_trips_the_keys_the_core_reads(component: str) -> None:
    config = validate_config(rich_raw())
    rebuilt = config_from_slice(config_slice(config, component))
    assert isinstance(rebuilt, ExperimentConfig)
    for key in COMPONENT_KEYS[component]:
        assert _get(_dump(rebuilt), key) == _get(_dump(config), key), key
    if "augmentation" in COMPONENT_KEYS[component]:
        assert list(rebuilt.augmentation) == ["VerticalFlip", "HorizontalFlip"]  # the order the policy applies


def test_locations_are_parameters_not_part_of_any_slice() -> None:
    config = validate_config(rich_raw())
    moved = validate_config({**rich_raw(), "dataset": {**rich_raw()["dataset"], "images": "gs://b/i", "masks": "gs://b/m"}, "push": {"registry": "s3://r"}})
    assert all(config_slice(config, name) == config_slice(moved, name) for name in COMPONENT_KEYS)
    rebuilt = config_from_slice(config_slice(config, "example_gen"), images="gs://b/i", masks="gs://b/m")
    assert (rebuilt.dataset.images, rebuilt.dataset.masks, rebuilt.dataset.eval_split) == ("gs://b/i", "gs://b/m", 0.3)
    assert config_from_slice(config_slice(config, "pusher"), registry="s3://r").push.registry == "s3://r"


@pytest.mark.parametrize(
    ("assignment", "readers"),
    [
        (("stages", [{"epochs": 9, "learning_rate": 0.01}, {"epochs": 2, "learning_rate": 0.001}]), {"trainer"}),
        (("batch", 5), {"trainer"}),
        (("optimizer", {"name": "sgd", "momentum": 0.9}), {"trainer"}),
        (("schedule", {"name": "cosine"}), {"trainer"}),
        (("callbacks", {"keep_best": 2}), {"trainer"}),
        (("export", ["saved_model"]), {"exporter"}),
        (("evaluation", {"min_mean_iou": 0.9}), {"evaluator", "cross_validation"}),
        (("beam", {"running_mode": "multi_threading", "num_workers": 2}), {"example_gen", "statistics_gen", "transform", "evaluator", "cross_validation"}),
    ],
)
def test_a_key_change_changes_only_the_slices_of_its_readers(assignment: tuple[str, Any], readers: set[str]) -> None:
    """`stages.0.epochs` is read by the trainer alone: the data components keep their cache."""
    key, value = assignment
    before, after = validate_config(rich_raw()), validate_config({**rich_raw(), key: value})
    assert {name for name in COMPONENT_KEYS if config_slice(before, name) != config_slice(after, name)} == readers


def test_resolve_locations_keeps_uris(tmp_path: Path) -> None:
    raw = rich_raw()
    raw["dataset"] = {**raw["dataset"], "images": "data/images", "masks": "s3://bucket/masks"}
    raw["validation"] = {"schema": "runs/old/schema"}
    resolved = locations(resolve_locations(validate_config(raw), tmp_path))
    assert resolved["dataset.images"] == str(tmp_path / "data" / "images") and resolved["dataset.masks"] == "s3://bucket/masks"
    assert resolved["validation.schema"] == str(tmp_path / "runs" / "old" / "schema") and "validation.baseline_statistics" not in resolved


# --- the guard: every `config.<key>` a core.py reads is in its row of COMPONENT_KEYS ---


def _field_key(model: type[BaseModel], attribute: str) -> str | None:
    field = model.model_fields.get(attribute)
    return None if field is None else field.alias or attribute


def _property_fields(name: str) -> set[str]:
    """The config fields an ExperimentConfig property derives from, through other properties."""
    source = textwrap.dedent(inspect.getsource(getattr(ExperimentConfig, name).fget))
    fields = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            key = _field_key(ExperimentConfig, node.attr)
            fields |= {key} if key else _property_fields(node.attr)
    return fields


def _member_fields(model: type[BaseModel], name: str) -> set[str]:
    """The fields of `model` that its property or method `name` reads (`self.<field>`)."""
    member = getattr(model, name)
    source = textwrap.dedent(inspect.getsource(member.fget if isinstance(member, property) else member))
    return {
        key
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
        for key in [_field_key(model, node.attr)]
        if key
    }


def _is_config(node: ast.AST) -> bool:
    """`config` or `self.config`."""
    if isinstance(node, ast.Attribute) and node.attr == "config":
        node = node.value
        return isinstance(node, ast.Name) and node.id == "self"
    return isinstance(node, ast.Name) and node.id == "config"


def config_reads(source: str) -> tuple[set[str], list[str]]:
    """(config keys a core reads, problems the guard cannot see through)."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    local_names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    reads, problems = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_config(node.value):
            key = _field_key(ExperimentConfig, node.attr)
            if key is None:
                if isinstance(getattr(ExperimentConfig, node.attr, None), property):
                    reads |= _property_fields(node.attr)
                elif node.attr not in CONFIG_METHODS:
                    problems.append(f"line {node.lineno}: config.{node.attr} is neither a key, a property nor an allowed method")
                continue
            section = ExperimentConfig.model_fields[node.attr].annotation
            parent = parents.get(node)
            if inspect.isclass(section) and issubclass(section, BaseModel) and isinstance(parent, ast.Attribute) and parent.value is node:
                field = _field_key(section, parent.attr)
                if field is None and hasattr(section, parent.attr):  # a property or method of the section: the fields it uses
                    reads |= {f"{key}.{name}" for name in _member_fields(section, parent.attr)}
                    continue
                key = f"{key}.{field or parent.attr}"
            reads.add(key)
        if isinstance(node, ast.Call) and any(_is_config(arg) for arg in [*node.args, *(keyword.value for keyword in node.keywords)]):
            callee = node.func.id if isinstance(node.func, ast.Name) else None
            if callee not in local_names:
                problems.append(f"line {node.lineno}: the whole config goes to {ast.unparse(node.func)}, outside this core.py")
    return reads, problems


def _covered(key: str, table: tuple[str, ...]) -> bool:
    """In the slice: the key itself, a section holding it, or a section whose keys the slice has (dataset.eval: its folders)."""
    return any(key == entry or key.startswith(entry + ".") or entry.startswith(key + ".") for entry in table)


@pytest.mark.parametrize("component", sorted(COMPONENT_KEYS))
def test_every_config_key_a_core_reads_is_in_its_slice(component: str) -> None:
    """A core that starts reading a new key fails here until the key is added to its row of
    segflow.config.component_config.COMPONENT_KEYS (otherwise it would get the key's default)."""
    reads, problems = config_reads(core_source(component))
    where = " + ".join([f"segflow/components/{component}/core.py", *(f"segflow/train/{path.name}" for path in CORE_MODULES.get(component, ()))])
    assert not problems, f"{where}: {problems}"
    given = COMPONENT_KEYS[component] + tuple(LOCATION_PARAMETERS[name] for name in COMPONENT_LOCATIONS.get(component, ()))
    missing = sorted(key for key in reads if not _covered(key, given))
    assert not missing, f"segflow/components/{component}/core.py reads {missing}: add them to COMPONENT_KEYS[{component!r}]"


def core_source(component: str) -> str:
    """A core.py and the library modules it is orchestration over (CORE_MODULES), as one source:
    the config they hand each other stays inside what the guard reads. Line numbers are the joined text's."""
    return "\n".join(path.read_text() for path in (COMPONENTS_DIR / component / "core.py", *CORE_MODULES.get(component, ())))


def test_the_trainers_slice_has_what_the_multi_worker_launcher_reads() -> None:
    """The trainer step hands its config to segflow/cluster/k8s_objects.py, which builds the worker pods."""
    source = (Path(__file__).resolve().parents[2] / "segflow" / "cluster" / "k8s_objects.py").read_text()
    reads, _ = config_reads(source)
    assert {"name", "trainer.workers", "kubernetes.namespace", "kubernetes.pvc"} <= reads
    assert not [key for key in reads if not _covered(key, COMPONENT_KEYS["trainer"])]


def test_every_component_with_a_config_is_in_the_table() -> None:
    with_config = {path.parent.name for path in COMPONENTS_DIR.glob("*/core.py") if "ExperimentConfig" in path.read_text()}
    assert with_config == set(COMPONENT_KEYS)


def test_the_guard_sees_reads_properties_and_escapes() -> None:
    reads, problems = config_reads(
        "def run(config):\n    a = config.beam.num_workers + config.num_labels\n    b = config.validation.schema_path\n"
        "    helper(config)\n    tf.config.experimental.enable_op_determinism()\n    c = config.bogus\n"
        "    return self.config.dataset\n"
    )
    assert reads == {"beam.num_workers", "classes", "validation.schema", "dataset"}
    assert problems == ["line 4: the whole config goes to helper, outside this core.py", "line 6: config.bogus is neither a key, a property nor an allowed method"]


# --- the dataset fingerprint ---


def _folders(root: Path) -> tuple[str, str]:
    for name in ("images", "masks"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(3):
            (root / name / f"{index:03d}.png").write_bytes(bytes([index]) * (10 + index))
    return str(root / "images"), str(root / "masks")


def test_fingerprint_changes_when_the_data_changes(tmp_path: Path) -> None:
    images, masks = _folders(tmp_path / "data")
    first = fingerprint_core.run({"images": images, "masks": masks}, tmp_path / "listing1")
    assert len(first) == 64 and fingerprint_core.run({"images": images, "masks": masks}, tmp_path / "listing2") == first
    (tmp_path / "data" / "images" / "003.png").write_bytes(b"new image")
    added = fingerprint_core.run({"images": images, "masks": masks}, tmp_path / "listing3")
    assert added != first
    os.utime(tmp_path / "data" / "masks" / "000.png", (1_000_000_000, 1_000_000_000))
    assert fingerprint_core.run({"images": images, "masks": masks}, tmp_path / "listing4") not in (first, added)


def test_fingerprint_lists_named_split_folders_and_ignores_absent_ones(tmp_path: Path) -> None:
    images, masks = _folders(tmp_path / "train")
    test_images, test_masks = _folders(tmp_path / "test")
    without = fingerprint_core.run({"images": images, "masks": masks, "test_images": "", "test_masks": ""}, tmp_path / "listing1")
    assert without == fingerprint_core.run({"images": images, "masks": masks}, tmp_path / "listing2")
    with_test = fingerprint_core.run({"images": images, "masks": masks, "test_images": test_images, "test_masks": test_masks}, tmp_path / "listing3")
    assert with_test != without
    (tmp_path / "test" / "images" / "003.png").write_bytes(b"new test image")
    assert fingerprint_core.run({"images": images, "masks": masks, "test_images": test_images, "test_masks": test_masks}, tmp_path / "listing4") != with_test


def test_fingerprint_is_of_the_content_listing_not_the_location(tmp_path: Path) -> None:
    import shutil

    images, masks = _folders(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copy2)
    digest = fingerprint_core.run({"images": images, "masks": masks}, tmp_path / "listing-a")
    assert fingerprint_core.run({"images": str(tmp_path / "b" / "images"), "masks": str(tmp_path / "b" / "masks")}, tmp_path / "listing-b") == digest
    listing = json.loads((tmp_path / "listing-a" / fingerprint_core.LISTING_FILE).read_text())
    assert listing["fingerprint"] == digest and [entry["name"] for entry in listing["images"]] == ["000.png", "001.png", "002.png"]


def test_fingerprint_of_a_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fingerprint_core.run({"images": str(tmp_path / "nowhere"), "masks": str(tmp_path)}, tmp_path / "listing")


def test_weights_files_are_locations_made_absolute(tmp_path: Path) -> None:
    """model.encoder_weights (a file, not `imagenet`) and stages' initial_weights name files:
    a local run resolves them like the dataset folders, and a compiled pipeline refuses them relative."""
    raw = rich_raw()
    raw["model"] = {**raw.get("model", {}), "encoder_weights": "weights/encoder.h5"}
    raw["stages"] = [{"epochs": 1, "learning_rate": 0.01}, {"epochs": 1, "learning_rate": 0.001, "initial_weights": "weights/stage.h5"}]
    resolved = resolve_locations(validate_config(raw), tmp_path)
    assert resolved.model.encoder_weights == str(tmp_path / "weights" / "encoder.h5")
    assert resolved.stages[1].initial_weights == str(tmp_path / "weights" / "stage.h5") and resolved.stages[0].initial_weights is None
    assert {"model.encoder_weights", "stages.1.initial_weights"} <= set(locations(validate_config(raw)))
    raw.update(backbone="mobilenetv2", shape=[64, 64, 3], model={"encoder_weights": "imagenet"})  # from the Keras cache: not a location
    assert "model.encoder_weights" not in locations(validate_config(raw))
