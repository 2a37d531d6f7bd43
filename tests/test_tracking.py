"""tracking.json: what produced a run (config hash, data fingerprint, source and versions)
beside its metrics and artifact paths. Fast: a run folder's inputs are written directly;
a real run's tracking.json is checked in tests/test_analyze.py."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from segflow import tracking
from segflow.config import ExperimentConfig
from segflow.io import write_json


def _run_folder(root: Path) -> dict[str, Any]:
    """The files a finished run has where tracking looks, and its summary."""
    write_json(root / "example_gen" / "examples" / "fingerprint.json", {"sha256": "ab" * 32, "shards": {}})
    (root / "trainer" / "model_run").mkdir(parents=True)
    (root / "trainer" / "model_run" / "history.csv").write_text("epoch,loss\n0,1.0\n")
    (root / "config.yaml").write_text("name: tiny\n")
    export = root / "exporter" / "exports" / "model_fp32.tflite"
    export.parent.mkdir(parents=True)
    export.write_bytes(b"model")
    return {
        "status": "succeeded",
        "metrics": {"eval": {"mean_iou": 0.5, "per_class_iou": {"a": 0.4, "b": 0.6}}, "test": {"mean_iou": 0.45}},
        "exports": {"tflite_fp32": {"path": str(export), "bytes": 5}, "onnx": {"status": "skipped"}},
    }


def test_tracking_json_records_what_produced_the_run(tmp_path: Path, make_config: Callable[..., ExperimentConfig]) -> None:
    config = make_config()
    summary = _run_folder(tmp_path)
    entry = tracking.track_run(tmp_path, config, summary)
    record = json.loads((tmp_path / tracking.TRACKING_FILE).read_text())
    canonical = json.dumps(config.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":"))
    assert record["config_hash"] == hashlib.sha256(canonical.encode()).hexdigest() == entry["config_hash"]
    assert record["data_fingerprint"] == "ab" * 32 == entry["data_fingerprint"]
    assert record["metrics"] == summary["metrics"]  # eval and test
    assert record["versions"]["segflow"] == "0.1.0" and record["versions"]["tensorflow"] and record["versions"]["python"].startswith("3.")
    # Relative to the run folder, so they hold after an upload; a skipped export has no path.
    assert record["artifacts"]["exports"] == {"tflite_fp32": "exporter/exports/model_fp32.tflite"}
    assert record["artifacts"]["history"] == "trainer/model_run/history.csv" and "evaluation" not in record["artifacts"]
    assert entry == {"file": "tracking.json", "config_hash": record["config_hash"], "data_fingerprint": "ab" * 32, "git_commit": record["git_commit"]}


@pytest.mark.skipif(not (tracking.SOURCE_ROOT / ".git").exists(), reason="segflow is not running from a git checkout")
def test_git_commit_of_the_source_checkout() -> None:
    revision = tracking.source_revision()
    assert re.fullmatch(r"[0-9a-f]{40}", revision["git_commit"]) and isinstance(revision["git_dirty"], bool)


def test_no_checkout_or_no_git_gives_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_config: Callable[..., ExperimentConfig]) -> None:
    """An installed wheel (no checkout), or a machine without git, still gets tracking.json."""
    with monkeypatch.context() as patch:
        patch.setenv("PATH", str(tmp_path / "empty"))
        assert tracking.source_revision() == {"git_commit": None, "git_dirty": None}
    monkeypatch.setattr(tracking, "SOURCE_ROOT", tmp_path)
    assert tracking.source_revision() == {"git_commit": None, "git_dirty": None}
    record = tracking.tracking_record(tmp_path, make_config(), {"status": "failed"})
    assert record["git_commit"] is None and record["data_fingerprint"] is None and record["metrics"] == {} and record["artifacts"] == {}


def test_a_checkout_nested_in_another_repository_is_not_taken_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """segflow installed under a virtualenv inside some project's repository: that project's
    commit is not segflow's."""
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "site-packages").mkdir()
    monkeypatch.setattr(tracking, "SOURCE_ROOT", tmp_path / "site-packages")
    assert tracking.source_revision()["git_commit"] is None
