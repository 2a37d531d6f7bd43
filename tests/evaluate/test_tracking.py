"""tracking.json: what produced a run (config hash, data fingerprint, source and versions)
beside its metrics and artifact paths. Fast: a run folder's inputs are written directly;
a real run's tracking.json is checked in tests/evaluate/test_analyze.py."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from segflow.evaluate import tracking
from segflow.config.experiment import ExperimentConfig
from segflow.utils.io import write_json


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


def _mlflow_run_folder(root: Path, config: ExperimentConfig) -> dict[str, Any]:
    """A finished run as the runner leaves it before logging: its files, summary.json and tracking.json."""
    summary = _run_folder(root)
    summary["metrics"]["eval"]["pixel_accuracy"] = 0.9
    (root / "config.yaml").write_text(config.to_yaml())
    rows = [f"{epoch},{1.0 - epoch * 0.1},{0.3 + epoch * 0.1}" for epoch in range(3)]
    (root / "trainer" / "model_run" / "history.csv").write_text("epoch,loss,val_mean_iou\n" + "\n".join(rows) + "\n")
    (root / "report.html").write_text("<html></html>")
    write_json(root / "summary.json", summary)
    summary["tracking"] = tracking.track_run(root, config, summary)
    return summary


def test_a_run_logged_to_a_file_mlflow_store(tmp_path: Path, make_config: Callable[..., ExperimentConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    # log_to_mlflow opts in to MLflow 3's file store itself; set-then-delete so the test restores the variable.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    uri = (tmp_path / "mlruns").as_uri()
    config = make_config(tracking={"mlflow_uri": uri, "experiment": "tiny-sweep"})
    run_dir = tmp_path / "tiny-20260101-120000"
    summary = _mlflow_run_folder(run_dir, config)
    outcome = tracking.log_to_mlflow(run_dir, config, summary)
    record = json.loads((run_dir / tracking.TRACKING_FILE).read_text())
    assert record["mlflow"] == outcome and outcome["uri"] == uri and "error" not in outcome

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(outcome["run_id"])
    assert run.info.run_name == "tiny-20260101-120000" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tiny-sweep"
    assert run.data.tags["segflow.config_hash"] == config.config_hash() and run.data.tags["segflow.data_fingerprint"] == "ab" * 32
    assert run.data.tags["segflow.version"] == "0.1.0" and run.data.tags.get("segflow.git_commit") == record["git_commit"]
    params = run.data.params
    assert params["name"] == "tiny" and params["batch"] == str(config.batch) and params["shape"] == "[32, 32, 3]"
    assert params["stages.0.epochs"] == str(config.stages[0].epochs) and params["tracking.mlflow_uri"] == uri
    for key in ("loss", "val_mean_iou"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(metric.step for metric in history) == [0, 1, 2]  # one per history.csv row
    assert [metric.value for metric in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda metric: metric.step)] == pytest.approx([1.0, 0.9, 0.8])
    eval_metrics = summary["metrics"]["eval"]
    assert run.data.metrics["eval.mean_iou"] == eval_metrics["mean_iou"] and run.data.metrics["eval.pixel_accuracy"] == eval_metrics["pixel_accuracy"]
    assert run.data.metrics["eval.iou.a"] == 0.4 and run.data.metrics["eval.iou.b"] == 0.6 and run.data.metrics["test.mean_iou"] == 0.45
    logged = {entry.path for entry in client.list_artifacts(run.info.run_id)}
    assert logged == {"summary.json", "tracking.json", "config.yaml", "report.html", "exports"}
    assert [entry.path for entry in client.list_artifacts(run.info.run_id, "exports")] == ["exports/model_fp32.tflite"]


def test_k_fold_histories_are_prefixed_by_fold(tmp_path: Path) -> None:
    for fold in (0, 2):
        history = tmp_path / "trainer" / f"fold-{fold}" / "model_run" / "history.csv"
        history.parent.mkdir(parents=True)
        history.write_text("epoch,loss\n0,1.0\n1,\n")  # an empty cell (NaN) is left out
    assert tracking.history_metrics(tmp_path) == [("fold-0/loss", 1.0, 0), ("fold-2/loss", 1.0, 0)]
    folds = {"folds": [{"fold": 2, "eval": {"mean_iou": 0.5, "per_class_iou": {"a": None}}}]}
    assert tracking.final_metrics({"metrics": folds}) == {"fold-2/eval.mean_iou": 0.5}


def test_an_unreachable_mlflow_server_is_a_warning(
    tmp_path: Path, make_config: Callable[..., ExperimentConfig], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finished run stays finished: the error lands in tracking.json and on the console."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = "http://127.0.0.1:9"
    config = make_config(tracking={"mlflow_uri": uri})
    summary = _mlflow_run_folder(tmp_path, config)
    outcome = tracking.log_to_mlflow(tmp_path, config, summary)
    assert outcome["uri"] == uri and outcome["error"] and "run_id" not in outcome
    assert json.loads((tmp_path / tracking.TRACKING_FILE).read_text())["mlflow"] == outcome
    warning = capsys.readouterr().err
    assert f"MLflow logging to {uri} failed" in warning and outcome["error"] in warning
