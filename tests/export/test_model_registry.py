"""The model registry's aliases (`current`, `previous`) and lineage: moves are compare-and-set
records, so racing pushers never name a half-written version or overwrite each other's
move; `segflow registry` lists, shows, promotes and rolls back."""
from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from segflow.cli import main
from segflow.components.pusher import core as pusher
from segflow.config.experiment import validate_config
from segflow.export import model_registry as registry
from segflow.export.exporters import EXPORTS_FILE
from segflow.utils import storage
from segflow.utils.io import write_json
from tests.conftest import pusher_inputs, tiny_raw_config
from tests.export.registry_racer import race
from tests.utils.test_storage import s3, s3_root  # noqa: F401  (the moto S3 server fixtures)

RACE_ROUNDS = 20


def _exports(root: Path) -> Path:
    """An Exporter's output folder with one passed export, as the Pusher reads it."""
    root.mkdir(parents=True)
    (root / "model.tflite").write_bytes(b"tflite")
    (root / "model.tflite.json").write_text("{}")
    write_json(root / EXPORTS_FILE, {"tflite_fp32": {"file": "model.tflite", "sidecar": "model.tflite.json", "status": "passed"}})
    return root


def _payload(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.tflite").write_bytes(os.urandom(64))
    return root


def test_pushes_move_current_only_when_it_is_still_the_compared_version(tmp_path: Path) -> None:
    config = validate_config(tiny_raw_config(tmp_path, push={"registry": str(tmp_path / "registry")}, evaluation={"change_thresholds": {"max_mean_iou_drop": 0.0}}))
    exports = _exports(tmp_path / "exports")
    first = pusher.run(config, exports, push_dir=tmp_path / "push1", **pusher_inputs(tmp_path / "in1"))
    assert (first["version"], first["current"], first["previous"]) == (1, True, None)
    second = pusher.run(config, exports, push_dir=tmp_path / "push2", **pusher_inputs(tmp_path / "in2", baseline_version=1))
    assert (second["version"], second["current"], second["previous"]) == (2, True, 1)
    # A run that was compared with version 1 while version 2 became current: published, not current.
    stale = pusher.run(config, exports, push_dir=tmp_path / "push3", **pusher_inputs(tmp_path / "in3", baseline_version=1))
    assert (stale["pushed"], stale["version"], stale["current"]) == (True, 3, False)
    assert "compared with version 1, but current of 'tiny' is version 2" in stale["current_reason"]
    # A first run compared with nothing, after another run pushed: not current either.
    late_first = pusher.run(config, exports, push_dir=tmp_path / "push4", **pusher_inputs(tmp_path / "in4"))
    assert late_first["current"] is False
    aliases = registry.read_aliases(config.push.registry, "tiny")
    assert (aliases.move, aliases.current, aliases.previous) == (2, 2, 1)
    # Not blessed: nothing published, aliases untouched.
    refused = pusher.run(config, exports, push_dir=tmp_path / "push5", **pusher_inputs(tmp_path / "in5", blessed=False, baseline_version=2))
    assert refused["pushed"] is False and registry.read_aliases(config.push.registry, "tiny") == aliases


def test_without_a_change_threshold_the_latest_blessed_push_serves(tmp_path: Path) -> None:
    config = validate_config(tiny_raw_config(tmp_path, push={"registry": str(tmp_path / "registry")}))
    exports = _exports(tmp_path / "exports")
    for round_ in range(3):
        pushed = pusher.run(config, exports, push_dir=tmp_path / f"push{round_}", **pusher_inputs(tmp_path / f"in{round_}", baseline_version=1))
        assert pushed["current"] is True
    assert registry.read_aliases(config.push.registry, "tiny").current == 3


def test_lineage_records_data_config_source_metrics_and_run(tmp_path: Path) -> None:
    config = validate_config(tiny_raw_config(tmp_path, push={"registry": str(tmp_path / "registry")}))
    exports = _exports(tmp_path / "exports")
    pusher.run(config, exports, push_dir=tmp_path / "push", **pusher_inputs(tmp_path / "in", mean_iou=0.625))
    lineage = registry.read_lineage(config.push.registry, "tiny", 1)
    assert lineage is not None
    assert (lineage["config_hash"], lineage["dataset_fingerprint"], lineage["examples_fingerprint"]) == ("c" * 64, "d" * 64, "e" * 64)
    assert lineage["counts"] == {"train": 6, "eval": 2} and lineage["metrics"]["mean_iou"] == 0.625
    assert lineage["blessing"]["blessed"] is True and lineage["parent"] is None and lineage["run"] == str(exports)
    assert set(lineage["source"]) == {"segflow", "git_commit", "git_dirty"}


def test_a_registry_from_before_aliases_serves_its_latest_version(tmp_path: Path) -> None:
    root = str(tmp_path / "registry")
    for _ in range(2):
        location = registry.publish(_payload(tmp_path / "payload"), root, "old")
        record = json.loads(storage.read_bytes(storage.join(location, registry.COMMIT_FILE)))
        del record["aliased"]  # as a segflow from before aliases committed it
        storage.write_bytes(storage.join(location, registry.COMMIT_FILE), json.dumps(record).encode())
    registry.publish(_payload(tmp_path / "payload"), root, "old")  # pushed, never made current
    assert registry.read_aliases(root, "old") == registry.Aliases(move=0, current=2, previous=None)
    moved = registry.move_current(root, "old", 1, expected=2, by="test", reason="first move")
    assert (moved.move, moved.current, moved.previous) == (1, 1, 2)


def test_aliases_never_name_an_uncommitted_version(tmp_path: Path) -> None:
    root = str(tmp_path / "registry")
    registry.publish(_payload(tmp_path / "payload"), root, "m")
    storage.write_bytes(storage.join(root, "m", "2", "model.tflite"), b"half a push")  # no commit marker
    with pytest.raises(FileNotFoundError, match="m version 2 is not a committed version"):
        registry.move_current(root, "m", 2, expected=registry.ANY_CURRENT, by="test", reason="typo")
    assert registry.read_aliases(root, "m").move == 0


def test_segflow_registry_list_show_promote_rollback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = validate_config(tiny_raw_config(tmp_path, push={"registry": str(tmp_path / "registry")}))
    exports = _exports(tmp_path / "exports")
    for version, mean_iou in ((1, 0.5), (2, 0.625), (3, 0.75)):
        pusher.run(config, exports, push_dir=tmp_path / f"push{version}", **pusher_inputs(tmp_path / f"in{version}", mean_iou=mean_iou))
    where = ["--registry", config.push.registry, "--name", "tiny"]
    capsys.readouterr()

    assert main(["registry", "rollback", *where]) == 0
    assert capsys.readouterr().out == "tiny: current is version 2 (previous: 3)\n"
    assert main(["registry", "promote", "1", *where, "--reason", "v2 misses thin membranes"]) == 0
    assert capsys.readouterr().out == "tiny: current is version 1 (previous: 2)\n"
    history = registry.alias_history(config.push.registry, "tiny")
    assert [(move.current, move.previous) for move in history] == [(1, None), (2, 1), (3, 2), (2, 3), (1, 2)]
    assert history[-1].reason == "v2 misses thin membranes" and "segflow registry promote" in str(history[-1].by)

    assert main(["registry", "list", *where]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["version", "created", "blessed", "mean_iou", "parent", "alias"]
    assert [line.split()[0:1] + line.split()[2:] for line in table[1:]] == [
        ["1", "yes", "0.5000", "-", "current"], ["2", "yes", "0.6250", "-", "previous"], ["3", "yes", "0.7500", "-", "-"],
    ]
    assert main(["registry", "list", *where, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["version"], row["alias"]) for row in rows] == [(1, "current"), (2, "previous"), (3, None)]

    assert main(["registry", "show", "2", *where]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["commit"]["version"] == 2 and shown["lineage"]["metrics"]["mean_iou"] == 0.625

    assert main(["registry", "promote", "9", *where]) == 2
    assert "tiny version 9 is not a committed version" in capsys.readouterr().err
    assert main(["registry", "list", "--registry", str(tmp_path / "empty"), "--name", "tiny"]) == 2
    assert "no committed version of 'tiny'" in capsys.readouterr().err


def test_rollback_without_a_previous_version_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "registry")
    registry.move_current(root, "m", int(storage.basename(registry.publish(_payload(tmp_path / "p"), root, "m"))), expected=None, by="test", reason="first")
    assert main(["registry", "rollback", "--registry", root, "--name", "m"]) == 2
    assert "no previous version to roll back to (current: 1)" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_pushers_racing_never_share_a_version_or_tear_the_aliases(where: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    root = storage.join(request.getfixturevalue("s3_root"), "registry") if where == "s3" else str(tmp_path / "registry")
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold TensorFlow's threads
    barrier, results = context.Barrier(2), context.Queue()
    racers = [context.Process(target=race, args=(root, str(_payload(tmp_path / f"payload{n}")), RACE_ROUNDS, barrier, results)) for n in range(2)]
    for racer in racers:
        racer.start()
    outcomes = [results.get(timeout=300) for _ in range(2 * RACE_ROUNDS)]
    for racer in racers:
        racer.join(timeout=60)
        assert racer.exitcode == 0

    versions = sorted(version for version, _, _ in outcomes)
    assert versions == list(range(1, 2 * RACE_ROUNDS + 1)) == registry.read_versions(root, "raced")  # distinct, all committed
    history = registry.alias_history(root, "raced")
    assert [move.move for move in history] == list(range(1, len(history) + 1))
    assert sorted(move.current for move in history) == sorted(version for version, _, moved in outcomes if moved)
    before: registry.Aliases | None = None
    for move in history:  # each move was conditioned on the move before it: a compare-and-set chain
        assert move.reason == f"expected {None if before is None else before.current}"
        assert move.previous == (None if before is None else before.current)
        before = move
    assert registry.read_aliases(root, "raced") == history[-1]
