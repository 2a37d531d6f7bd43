"""`stages[].initial_weights: current`: resolved once, before training, to the weights of the
registry's current version; another network is an error that names what differs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segflow.components.pusher import core as pusher
from segflow.config.experiment import ExperimentConfig, validate_config
from segflow.export import model_registry as registry
from segflow.export.exporters import EXPORTS_FILE
from segflow.train.network import build_network
from segflow.config.component_config import REGISTRY_CURRENT
from segflow.train.warm_start import NETWORK_FOLDER, NETWORK_WEIGHTS, resolve_current, write_network
from segflow.utils.errors import ConfigError
from segflow.utils.io import write_json
from tests.conftest import pusher_inputs, tiny_raw_config


def _config(tmp_path: Path, **overrides: object) -> ExperimentConfig:
    stages = [{"epochs": 1, "learning_rate": 0.01, "initial_weights": REGISTRY_CURRENT}]
    return validate_config(tiny_raw_config(tmp_path, push={"registry": str(tmp_path / "registry")}, stages=stages, **overrides))


def _push_network(config: ExperimentConfig, root: Path, parent: int | None = None) -> np.ndarray:
    """Push a version whose network is `config`'s, with random weights; return its first kernel."""
    network = build_network(config)
    inputs = pusher_inputs(root / "inputs", parent=parent)
    write_network(inputs["model_dir"] / NETWORK_FOLDER, config, network.save_weights, parent)
    exports = root / "exports"
    exports.mkdir(parents=True)
    (exports / "model.tflite").write_bytes(b"tflite")
    write_json(exports / EXPORTS_FILE, {"tflite_fp32": {"file": "model.tflite", "status": "passed"}})
    assert pusher.run(config, exports, push_dir=root / "push", **inputs)["current"]
    return np.asarray(network.get_weights()[0])


def test_no_current_version_trains_from_scratch(tmp_path: Path) -> None:
    resolved, parent = resolve_current(_config(tmp_path))
    assert parent is None and resolved.stages[0].initial_weights is None


def test_current_resolves_to_its_weights_and_they_load(tmp_path: Path) -> None:
    config = _config(tmp_path)
    kernel = _push_network(config, tmp_path / "first")
    resolved, parent = resolve_current(config)
    assert parent == 1
    weights = resolved.stages[0].initial_weights
    assert weights == str(tmp_path / "registry" / "tiny" / "1" / NETWORK_FOLDER / NETWORK_WEIGHTS)
    loaded = build_network(config)
    loaded.load_weights(weights)
    np.testing.assert_array_equal(loaded.get_weights()[0], kernel)
    assert registry.read_lineage(config.push.registry, "tiny", 1)["parent"] is None
    _push_network(config, tmp_path / "second", parent=1)
    assert registry.read_lineage(config.push.registry, "tiny", 2)["parent"] == 1
    assert resolve_current(config)[1] == 2


def test_another_network_is_an_error_naming_what_differs(tmp_path: Path) -> None:
    _push_network(_config(tmp_path), tmp_path / "first")
    other = _config(tmp_path, classes=["background", "circle", "square"], model={"depth": 2, "base_filters": 8})
    with pytest.raises(ConfigError) as error:
        resolve_current(other)
    message = str(error.value)
    assert "version 1 of 'tiny' is another network than this config's" in message
    assert 'classes ["background", "circle", "rectangle", "triangle"] there, ["background", "circle", "square"] here' in message
    assert "model.base_filters 4 there, 8 here" in message and "architecture" not in message
    # Settings that do not change the weights are no reason to refuse.
    resolve_current(_config(tmp_path, model={"depth": 2, "base_filters": 4, "dropout": 0.3}))


def test_a_version_without_a_network_is_an_error(tmp_path: Path) -> None:
    config = _config(tmp_path)
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "model.tflite").write_bytes(b"old")
    registry.move_current(config.push.registry, "tiny", int(Path(registry.publish(payload, config.push.registry, "tiny")).name), expected=None, by="test", reason="old push")
    with pytest.raises(ConfigError, match="version 1 of 'tiny' in .* has no network weights to start from"):
        resolve_current(config)
