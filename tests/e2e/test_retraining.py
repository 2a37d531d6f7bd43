"""Scheduled retraining through `segflow run` as a scheduler calls it, night after night on one
registry: a first version, a quiet night that skips, a worse model that is kept out, new data
that becomes `current`, and a rollback."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from segflow.cli import main
from segflow.data.demo_data import write_demo_dataset
from segflow.export import model_registry as registry
from tests.conftest import tiny_raw_config


def _night(config: Path, run: Path, *overrides: str, exit_code: int = 0) -> dict[str, Any]:
    assert main(["run", str(config), "-o", str(run), *(arg for override in overrides for arg in ("--set", override))]) == exit_code
    return dict(json.loads((run / "summary.json").read_text()))


@pytest.mark.extended  # four DAG runs through the CLI (three of them train)
def test_nights_of_retraining_on_one_registry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_demo_dataset(tmp_path / "data", count=16, size=32)
    store = str(tmp_path / "registry")
    raw = tiny_raw_config(
        data, push={"registry": store}, export=["saved_model"], stages=[{"epochs": 2, "learning_rate": 0.01, "initial_weights": "current"}],
        evaluation={"change_thresholds": {"max_mean_iou_drop": 0.5}},
    )
    raw["dataset"]["assignment"] = "stable"  # the data grows: no file changes split
    raw["validation"] = {"baseline_statistics": "current", "on_drift": "fail"}  # new data must look like what the current version learned
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump(raw))

    # Night 1: nothing to warm-start from: trained from scratch; the first version serves.
    first = _night(config, tmp_path / "night1")
    assert first["status"] == "succeeded" and first["retrain"]["train"] is True
    assert (first["push"]["version"], first["push"]["current"]) == (1, True)
    assert "no current version of 'tiny'" in (tmp_path / "night1" / "trainer" / "log.txt").read_text()

    # Night 2: nothing changed: skipped after the fingerprint, the trainer never started, the registry untouched.
    capsys.readouterr()
    quiet = _night(config, tmp_path / "night2")
    assert quiet["status"] == "skipped" and quiet["reason"] == "no new data since version 1 (same files, same config)"
    assert {name: entry["status"] for name, entry in quiet["components"].items() if entry["status"] != "skipped"} == {
        "dataset_fingerprint": "succeeded", "retrain_gate": "succeeded",
    }
    assert not (tmp_path / "night2" / "trainer").exists() and "metrics" not in quiet and "push" not in quiet
    assert "status: skipped: no new data since version 1 (same files, same config) (--force trains anyway)" in capsys.readouterr().out
    assert registry.read_versions(store, "tiny") == [1] and len(registry.alias_history(store, "tiny")) == 1

    # Night 3: new files arrive, but the model trained on them is worse (an untrained one) than
    # version 1 on the same eval images: not blessed, nothing pushed, version 1 still serves.
    _arrive(write_demo_dataset(tmp_path / "new", count=6, size=32, seed=1), data, "day3")
    worse = _night(
        config, tmp_path / "night3", "stages.0.learning_rate=1.0e-9", "stages.0.initial_weights=null", "evaluation.change_thresholds.max_mean_iou_drop=0.0",
    )
    assert worse["retrain"]["reason"] == "new data and a changed config since version 1"
    assert worse["blessed"] is False and "max_mean_iou_drop" in worse["blessing"]["failed"] and worse["blessing"]["baseline"]["version"] == 1
    assert "push" not in worse and registry.read_aliases(store, "tiny").current == 1

    # Night 4: the same new files with the usual recipe, warm-started from version 1: blessed against it, pushed, current.
    grown = _night(config, tmp_path / "night4")
    assert grown["retrain"]["reason"] == "new data since version 1" and grown["blessing"]["baseline"]["version"] == 1
    assert (grown["push"]["version"], grown["push"]["current"], grown["push"]["previous"]) == (2, True, 1)
    assert grown["counts"]["examples_written"] == first["counts"]["examples_written"] + 6
    assert "warm start from version 1 of 'tiny'" in (tmp_path / "night4" / "trainer" / "log.txt").read_text()
    lineage = registry.read_lineage(store, "tiny", 2)
    assert lineage is not None and lineage["parent"] == 1 and lineage["counts"] == grown["counts"] and lineage["dataset_fingerprint"] != registry.read_lineage(store, "tiny", 1)["dataset_fingerprint"]

    # Night 5: a new scanner's captures at another resolution: drift against version 2's data, stopped before training.
    _arrive(write_demo_dataset(tmp_path / "scanner", count=4, size=48, seed=2), data, "day5")
    drifted = _night(config, tmp_path / "night5", exit_code=1)
    validator = drifted["components"]["example_validator"]
    assert drifted["status"] == "failed" and validator["status"] == "failed" and drifted["components"]["trainer"]["status"] == "not_run"
    assert "IMAGE_SIZE_CHANGED (train)" in validator["error"] and "against version 2, the current one" in validator["error"]
    assert registry.read_versions(store, "tiny") == [1, 2] and registry.read_aliases(store, "tiny").current == 2

    # A person rolls back; the next run compares with what serves again.
    assert main(["registry", "rollback", "--registry", store, "--name", "tiny"]) == 0
    capsys.readouterr()
    assert main(["registry", "list", "--registry", store, "--name", "tiny"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(row[0], row[2], row[-2], row[-1]) for row in rows] == [("1", "yes", "-", "current"), ("2", "yes", "1", "previous")]


def _arrive(batch: Path, data: Path, prefix: str) -> None:
    """A new day's captures: a dataset's images and masks copied in under names of their own."""
    for folder in ("images", "masks"):
        for path in sorted((batch / folder).iterdir()):
            shutil.copy2(path, data / folder / f"{prefix}-{path.name}")
