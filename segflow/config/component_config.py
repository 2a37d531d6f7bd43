"""What part of the experiment config each component gets, and where the data lives.

KFP's cache key of a task is its component and its inputs. Given the whole config, every
task's key changed with any key (a new epoch count re-ran ExampleGen); given only the
keys its core reads, a task re-runs when, and only when, something it depends on changed.
`COMPONENT_KEYS` is that table, the one place it is written down; tests/config/test_component_config.py
checks it against the `config.<key>` reads of every core.py.

Locations are not in any slice: the dataset folders and the model registry are pipeline
parameters (`LOCATION_PARAMETERS`), so one compiled pipeline serves many datasets, and
the wrapper lays them over the slice (`config_from_slice(text, images=..., masks=...)`).
Keys are written as in the YAML file (`validation.schema`, not the attribute name).
`run_core` is the body every KFP wrapper calls. No KFP import here: wrappers import it at run time.
"""
from __future__ import annotations

import copy
import importlib
import json
import os
from typing import Any

from segflow.config.experiment import ExperimentConfig
from segflow.utils.storage import absolute

# component -> the config keys its core reads ("beam" is the whole section, "dataset.eval_split" one key).
COMPONENT_KEYS: dict[str, tuple[str, ...]] = {
    # dataset.group_by and dataset.multipage shape the examples: listed before ExampleGen reads them.
    "example_gen": ("dataset.eval_split", "dataset.group_by", "dataset.multipage", "dataset.folds", "dataset.assignment", "classes", "mask_values", "ignore_index", "beam"),
    "statistics_gen": ("classes", "ignore_index", "shape", "beam"),
    "schema_gen": ("classes", "validation.schema"),
    "example_validator": ("classes", "validation", "name"),  # name: baseline_statistics current, in the registry
    "transform": ("shape", "normalization", "beam"),
    "trainer": (
        "classes", "ignore_index", "shape", "patches", "architecture", "backbone", "model", "augmentation", "loss", "class_weights", "batch", "stages", "seed", "deterministic",
        "optimizer", "schedule", "callbacks", "qat",
        "trainer",
        "name", "kubernetes",  # the multi-worker launcher names and places its worker pods with them (segflow/cluster/k8s_objects.py)
    ),
    "evaluator": ("evaluation", "dataset.group_by", "beam", "name"),  # group_by: the `source` slice; name: the baseline in the registry
    "cross_validation": ("evaluation", "dataset.group_by", "dataset.folds", "dataset.folds_to_train", "beam"),
    "exporter": ("export", "qat", "name"),  # qat: recorded with the tflite_int8_qat export; name: the sidecars' source run
    "retrain_gate": ("name",),  # name: the current version in the registry
    "pusher": ("name", "evaluation.change_thresholds"),  # change_thresholds: whether `current` must still be the compared version
}

# pipeline parameter -> the config key it overrides.
LOCATION_PARAMETERS = {
    "images": "dataset.images",
    "masks": "dataset.masks",
    "eval_images": "dataset.eval.images",
    "eval_masks": "dataset.eval.masks",
    "test_images": "dataset.test.images",
    "test_masks": "dataset.test.masks",
    "registry": "push.registry",
}
# The named split folders are optional: their parameters are "" when the config has none.
OPTIONAL_PARAMETERS = ("eval_images", "eval_masks", "test_images", "test_masks")
DATASET_PARAMETERS = ("images", "masks", *OPTIONAL_PARAMETERS)

# component -> the pipeline parameters it receives (and lays over its slice).
# The validator's and the trainer's: `validation.baseline_statistics: current` and `stages[].initial_weights: current`.
COMPONENT_LOCATIONS = {
    "example_gen": DATASET_PARAMETERS, "example_validator": ("registry",), "retrain_gate": ("registry",), "trainer": ("registry",), "evaluator": ("registry",),
    "pusher": ("registry",),
}

# stages[].initial_weights and validation.baseline_statistics naming what the registry's current version
# holds (segflow.train.warm_start, the ExampleValidator), not a path.
REGISTRY_CURRENT = "current"

# Every config key that names a file, folder or registry (a path or a URI).
LOCATIONS = (
    "dataset.images", "dataset.masks", "dataset.eval.images", "dataset.eval.masks", "dataset.test.images", "dataset.test.masks",
    "push.registry", "validation.schema", "validation.baseline_statistics",
)

# What a slice leaves out and a valid config needs; every other key takes its default.
PLACEHOLDERS: dict[str, Any] = {"name": "sliced", "dataset": {"images": "", "masks": ""}}


def _get(raw: Any, key: str) -> Any:
    """The value at a dotted key (list items by index: stages.0.initial_weights); None when a
    section on the way is unset (dataset.eval)."""
    for part in key.split("."):
        if raw is None:
            return None
        raw = raw[int(part)] if isinstance(raw, list) else raw[part]
    return raw


def _set(raw: Any, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        if isinstance(raw, list):
            raw = raw[int(part)]
            continue
        if raw.get(part) is None:
            raw[part] = {}
        raw = raw[part]
    if isinstance(raw, list):
        raw[int(last)] = value
    else:
        raw[last] = value


def _raw(config: ExperimentConfig) -> dict[str, Any]:
    return config.model_dump(mode="json", by_alias=True)


def _validated(raw: dict[str, Any]) -> ExperimentConfig:
    return ExperimentConfig.model_validate_json(json.dumps(raw))


def config_slice(config: ExperimentConfig, component: str) -> str:
    """The JSON of only the keys `component` reads, in the config's own order (the order of
    `augmentation` is the order the policy applies, so keys are not sorted)."""
    raw, picked = _raw(config), {}
    for key in COMPONENT_KEYS[component]:
        _set(picked, key, _get(raw, key))
    return json.dumps(picked, separators=(",", ":"))


def config_from_slice(text: str, **locations: str) -> ExperimentConfig:
    """A full, validated ExperimentConfig from a slice: keys outside it take placeholders or
    defaults, and `locations` (pipeline parameters: images, masks, registry) are laid over it."""
    raw = copy.deepcopy(PLACEHOLDERS)
    for key, value in json.loads(text).items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    for parameter, value in locations.items():
        if value or parameter not in OPTIONAL_PARAMETERS:
            _set(raw, LOCATION_PARAMETERS[parameter], value)
    return _validated(raw)


def location_arguments(config: ExperimentConfig, parameters: tuple[str, ...] | None = None) -> dict[str, str]:
    """The pipeline parameters (all, or the named ones) with this config's values ("" for
    named split folders the config does not have)."""
    raw = _raw(config)
    return {name: _get(raw, LOCATION_PARAMETERS[name]) or "" for name in parameters or LOCATION_PARAMETERS}


def locations(config: ExperimentConfig) -> dict[str, str]:
    """Every location key that is set, with its value: LOCATIONS, a weights file given as
    model.encoder_weights (not `imagenet`, which is looked up in the Keras cache) and each
    stage's initial_weights."""
    raw = _raw(config)
    keys = [*LOCATIONS, *(f"stages.{index}.initial_weights" for index in range(len(config.stages)))]
    if config.model.encoder_weights != "imagenet":
        keys.append("model.encoder_weights")
    found = {key: _get(raw, key) for key in keys}
    return {key: value for key, value in found.items() if value is not None and value != REGISTRY_CURRENT}


def resolve_locations(config: ExperimentConfig, base: str | os.PathLike[str] | None = None) -> ExperimentConfig:
    """Relative paths made absolute against `base` (default: the working directory); URIs kept."""
    raw, root = _raw(config), base or os.getcwd()
    for key, value in locations(config).items():
        _set(raw, key, absolute(value, root))
    return _validated(raw)


def run_core(name: str, config_slice: str, *paths: str, fold: int = -1, arguments: dict[str, Any] | None = None, **locations: str) -> Any:
    """The body of a KFP wrapper: `segflow.components.<name>.core.run(config, *paths)` with the
    config rebuilt from the task's slice and location parameters, under `runtime.execute`.
    The last path is an output artifact's: its folder, the task's, gets `component.json`.
    `fold` (a k-fold run's trainers and evaluators; -1: none) and `arguments` (the task's other
    parameters) are passed on to the core as keywords. (Not in segflow.cluster.kfp_base: inside a KFP executor `kfp.dsl` has no `component` decorator.)"""
    from segflow.utils.runtime import execute

    core = importlib.import_module(f"segflow.components.{name}.core")
    folded: dict[str, Any] = {"fold": fold} if fold >= 0 else {}
    folded.update(arguments or {})
    # The config is rebuilt inside `execute`, so that an error in it is in the task's log and record.
    return execute(name, os.path.dirname(paths[-1]), lambda: core.run(config_from_slice(config_slice, **locations), *paths, **folded))
