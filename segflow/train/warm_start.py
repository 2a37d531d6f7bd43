"""Warm starts from the model registry: `stages[].initial_weights: current` starts a stage from
the network of the version that serves now, so a nightly retraining continues from what was
learned instead of starting from scratch.

Every trained model carries its network's weights and the recipe that shapes them
(`network/network.weights.h5`, `network/network.json`: architecture, backbone, input shape,
classes, the `model` settings that change weights); the Pusher publishes both with each
version. Before training, the recipe of `current` is compared with this config's: any
difference is an error that names it, since the weights would not fit (or, for classes,
would mean other things). With no current version yet (the first night) the stage starts
from scratch and says so.
"""
from __future__ import annotations

import json
import os
from typing import Any

from segflow.config.component_config import REGISTRY_CURRENT
from segflow.config.experiment import ExperimentConfig
from segflow.export.model_registry import read_aliases, version_location
from segflow.utils import storage
from segflow.utils.errors import ConfigError
from segflow.utils.io import write_json
from segflow.utils.runtime import log

NETWORK_FOLDER = "network"  # in the trainer's model artifact and in each registry version
NETWORK_WEIGHTS = "network.weights.h5"
NETWORK_RECIPE = "network.json"
# `model` settings that do not change which weights a network has.
WEIGHTLESS_SETTINGS = ("dropout", "encoder_weights", "freeze_encoder")


def network_recipe(config: ExperimentConfig) -> dict[str, Any]:
    """What decides the network's weights and what they mean."""
    model = {key: value for key, value in config.model.model_dump(mode="json").items() if key not in WEIGHTLESS_SETTINGS}
    return {
        "architecture": config.architecture,
        "backbone": config.backbone,
        "shape": list(config.shape),
        "classes": list(config.class_names),
        "sigmoid": config.sigmoid_head,
        "model": model,
    }


def write_network(folder: str | os.PathLike[str], config: ExperimentConfig, save_weights: Any, parent: int | None) -> None:
    """network.weights.h5 (through `save_weights`, the Keras model's) and network.json: the
    recipe and the registry version the training started from (`parent`, None: scratch)."""
    os.makedirs(folder, exist_ok=True)
    save_weights(os.path.join(folder, NETWORK_WEIGHTS))
    write_json(os.path.join(folder, NETWORK_RECIPE), {**network_recipe(config), "parent": parent})


def read_recipe(folder: str) -> dict[str, Any]:
    return dict(json.loads(storage.read_bytes(storage.join(folder, NETWORK_RECIPE))))


def _differences(own: dict[str, Any], theirs: dict[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(own) | set(theirs)):
        if key == "parent":
            continue
        mine, other = own.get(key), theirs.get(key)
        if isinstance(mine, dict) and isinstance(other, dict):
            found += _differences(mine, other, f"{prefix}{key}.")
        elif mine != other:
            found.append(f"{prefix}{key} {json.dumps(other)} there, {json.dumps(mine)} here")
    return found


def resolve_current(config: ExperimentConfig) -> tuple[ExperimentConfig, int | None]:
    """`config` with every `initial_weights: current` replaced by the weights file of the
    registry's current version (or removed when there is none), and that version's number.
    ConfigError, before any training, when its network differs from this config's."""
    if not any(stage.initial_weights == REGISTRY_CURRENT for stage in config.stages):
        return config, None
    registry, name = config.push.registry, config.name
    version = read_aliases(registry, name).current
    if version is None:
        log(f"trainer: initial_weights: current: no current version of {name!r} in {registry} yet; training from scratch")
        weights = None
    else:
        folder = storage.join(version_location(registry, name, version), NETWORK_FOLDER)
        if not storage.exists(storage.join(folder, NETWORK_RECIPE)):
            raise ConfigError(f"stages[].initial_weights: current: version {version} of {name!r} in {registry} has no network weights to start from (pushed before they were published)")
        differences = _differences(network_recipe(config), read_recipe(folder))
        if differences:
            raise ConfigError(
                f"stages[].initial_weights: current: version {version} of {name!r} is another network than this config's: "
                f"{'; '.join(differences)}. Train from scratch (drop initial_weights), or change the config back"
            )
        weights = storage.join(folder, NETWORK_WEIGHTS)
        log(f"trainer: warm start from version {version} of {name!r} ({weights})")
    stages = [stage.model_copy(update={"initial_weights": weights}) if stage.initial_weights == REGISTRY_CURRENT else stage for stage in config.stages]
    return config.model_copy(update={"stages": stages}), version
