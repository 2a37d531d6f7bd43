"""Blessing: the threshold logic (TFMA's validator on hand-made metrics, read back as
blessing.json records) and, through kfp.local, a second run worse than the registry's latest
version by more than the change threshold: not exported, not pushed, named in summary.json."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from segflow.evaluate.beam_evaluation import BASELINE, CANDIDATE, BlessingThresholds, eval_config, metric_keys
from segflow.components.evaluator.core import blessing_line, blessing_record, blessing_thresholds
from segflow.config.experiment import EvaluationConfig

CLASSES = ("background", "cell", "membrane")


def _metrics(mean_iou: float, per_class: list[float]) -> dict[str, Any]:
    return {"mean_iou": mean_iou, "per_class_iou": dict(zip(CLASSES, per_class))}


def _validate(thresholds: BlessingThresholds, candidate: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """TFMA's validator on the overall slice of hand-made metrics, as blessing.json."""
    from tensorflow_model_analysis.evaluators.metrics_validator import validate_metrics

    config = eval_config([{}], CLASSES, 0, thresholds, baseline=baseline is not None)
    keyed = metric_keys(candidate, CANDIDATE if baseline is not None else "")
    overall = {"metrics": candidate}
    if baseline is not None:
        reference = metric_keys(baseline, BASELINE)
        keyed.update(reference)
        keyed.update({key.make_diff_key(): value - reference[key.make_baseline_key(BASELINE)] for key, value in metric_keys(candidate, CANDIDATE).items()})
        overall["baseline_metrics"] = baseline
    located = {"version": 3, "location": "/registry/tiny/3/saved_model"} if baseline is not None else {"version": None, "location": None, "reason": "empty"}
    return blessing_record(thresholds, CLASSES, overall, validate_metrics(((), keyed), config), located)


def test_value_thresholds_without_a_baseline() -> None:
    thresholds = blessing_thresholds(EvaluationConfig(min_mean_iou=0.5, min_class_iou={"cell": 0.6}), CLASSES)
    assert thresholds == BlessingThresholds(0.5, {1: 0.6}, None)
    record = _validate(thresholds, _metrics(0.55, [0.9, 0.5, 0.25]), None)
    assert not record["blessed"] and record["failed"] == ["min_class_iou[cell]"]
    assert [(entry["name"], entry["passed"], entry["baseline"]) for entry in record["thresholds"]] == [("min_mean_iou", True, None), ("min_class_iou[cell]", False, None)]
    assert _validate(thresholds, _metrics(0.7, [0.9, 0.65, 0.55]), None)["blessed"]


def test_one_class_threshold_applies_to_every_class() -> None:
    thresholds = blessing_thresholds(EvaluationConfig(min_class_iou=0.3), CLASSES)
    record = _validate(thresholds, _metrics(0.6, [0.9, 0.29, 0.61]), None)
    assert record["failed"] == ["min_class_iou[cell]"] and len(record["thresholds"]) == 4
    with pytest.raises(ValueError, match="names nucleus, not classes"):
        blessing_thresholds(EvaluationConfig(min_class_iou={"nucleus": 0.3}), CLASSES)


def test_change_threshold_against_the_baseline() -> None:
    thresholds = blessing_thresholds(EvaluationConfig(change_thresholds={"max_mean_iou_drop": 0.01}), CLASSES)
    baseline = _metrics(0.60, [0.9, 0.5, 0.4])
    worse = _validate(thresholds, _metrics(0.58, [0.9, 0.45, 0.39]), baseline)
    assert not worse["blessed"] and worse["failed"] == ["max_mean_iou_drop"]
    drop = next(entry for entry in worse["thresholds"] if entry["name"] == "max_mean_iou_drop")
    assert drop["value"] == pytest.approx(0.02) and drop["baseline"] == pytest.approx(0.60) and drop["bound"] == 0.01
    assert "max_mean_iou_drop 0.0200 (> 0.01)" in blessing_line(worse) and "baseline version 3" in blessing_line(worse)
    assert _validate(thresholds, _metrics(0.595, [0.9, 0.5, 0.385]), baseline)["blessed"]  # within the allowed drop
    assert _validate(thresholds, _metrics(0.70, [0.9, 0.6, 0.6]), baseline)["blessed"]


def test_no_change_threshold_on_the_first_run() -> None:
    """An empty registry: the change threshold is not checked, the value thresholds are."""
    thresholds = blessing_thresholds(EvaluationConfig(min_mean_iou=0.2, change_thresholds={"max_mean_iou_drop": 0.0}), CLASSES)
    record = _validate(thresholds, _metrics(0.3, [0.5, 0.2, 0.2]), None)
    assert record["blessed"] and [entry["name"] for entry in record["thresholds"]] == ["min_mean_iou"]


def test_the_baseline_is_the_current_version(tmp_path: Path) -> None:
    from segflow.components.evaluator.core import find_baseline
    from segflow.export.model_registry import ANY_CURRENT, move_current, publish

    registry = str(tmp_path / "registry")
    assert find_baseline(registry, "tiny")["reason"].startswith("no committed version of 'tiny'")
    for exports in ({"saved_model": {"file": "saved_model", "status": "passed"}}, {"tflite_fp32": {"file": "model_fp32.tflite", "status": "passed"}}):
        staged = tmp_path / "staged"
        shutil.rmtree(staged, ignore_errors=True)
        (staged / "saved_model").mkdir(parents=True)
        (staged / "exports.json").write_text(json.dumps(exports))
        version = int(Path(publish(staged, registry, "tiny")).name)
        assert find_baseline(registry, "tiny")["version"] == version - 1 or version == 1  # published, not yet current
        move_current(registry, "tiny", version, expected=ANY_CURRENT, by="test", reason="pushed")
        if "saved_model" in exports:
            assert find_baseline(registry, "tiny") == {"version": 1, "location": str(tmp_path / "registry" / "tiny" / "1" / "saved_model")}
    (tmp_path / "registry" / "tiny" / "3").mkdir()  # a push that stopped half-way: no _COMMITTED, ignored
    assert find_baseline(registry, "tiny") == {"version": 2, "location": None, "reason": "version 2 has no saved_model export (the served SavedModel) to evaluate"}
    move_current(registry, "tiny", 1, expected=2, by="test", reason="rollback")
    assert find_baseline(registry, "tiny")["version"] == 1  # what serves, not the latest


def _worse_run(config: Path, raw: dict[str, Any], run: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """Run the DAG on an untrained model (learning rate 1e-9): it falls more than
    max_mean_iou_drop below the registry's latest version, and the run still succeeds."""
    from segflow.cli import main

    raw["stages"] = [{"epochs": 1, "learning_rate": 1e-9}]
    config.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["run", str(config), "-o", str(run)]) == 0  # the pipeline did its job: exit 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["blessed"] is False
    assert "max_mean_iou_drop" in summary["blessing"]["failed"] and summary["blessing"]["baseline"]["version"] == 1
    assert {name: summary["components"][name]["status"] for name in ("evaluator", "exporter", "pusher")} == {"evaluator": "succeeded", "exporter": "skipped", "pusher": "skipped"}
    assert "push" not in summary and "exports" not in summary
    assert "status: succeeded, not blessed: max_mean_iou_drop" in capsys.readouterr().out
    metrics = summary["metrics"]["eval"]
    assert metrics["baseline"]["version"] == 1 and metrics["baseline"]["mean_iou"] - metrics["mean_iou"] > raw["evaluation"]["change_thresholds"]["max_mean_iou_drop"]
    return summary


@pytest.mark.extended
def test_a_worse_run_than_the_registrys_is_not_exported_or_pushed(trained: dict[str, Any], tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The registry holds the session's trained model (its saved_model export, as the pusher
    publishes it) as version 1; one kfp.local run of a worse model is not exported or pushed."""
    from segflow.export.model_registry import ANY_CURRENT, move_current, publish
    from segflow.export.serving import SERVING_SUBDIR
    from tests.conftest import tiny_raw_config

    registry = tmp_path / "registry"
    version = tmp_path / "version"
    version.mkdir()
    shutil.copytree(trained["model"] / SERVING_SUBDIR, version / "saved_model")
    (version / "exports.json").write_text(json.dumps({"saved_model": {"file": "saved_model", "status": "passed"}}))
    publish(version, str(registry), "tiny")
    move_current(str(registry), "tiny", 1, expected=ANY_CURRENT, by="test", reason="the session's model serves")
    raw = tiny_raw_config(tiny_data, push={"registry": str(registry)}, export=["saved_model"], evaluation={"change_thresholds": {"max_mean_iou_drop": 0.01}})
    _worse_run(tmp_path / "tiny.yaml", raw, tmp_path / "run", capsys)
    assert sorted(path.name for path in (registry / "tiny").iterdir()) == ["1", "_aliases"]


@pytest.mark.slow
def test_a_worse_second_run_is_not_exported_or_pushed(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The whole story through kfp.local (two runs, about 4 minutes on 2 shared cores): run 1
    (empty registry) is blessed on its value thresholds and pushed; run 2, worse, is not."""
    from segflow.cli import main
    from tests.conftest import tiny_raw_config

    registry = tmp_path / "registry"
    raw = tiny_raw_config(
        tiny_data, push={"registry": str(registry)}, export=["saved_model"], stages=[{"epochs": 2, "learning_rate": 0.01}],
        evaluation={"min_class_iou": 0.0, "change_thresholds": {"max_mean_iou_drop": 0.01}},
    )
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config), "-o", str(tmp_path / "run1")]) == 0
    first = json.loads((tmp_path / "run1" / "summary.json").read_text())
    assert first["status"] == "succeeded" and first["blessed"] and first["push"]["version"] == 1
    assert first["blessing"]["failed"] == [] and first["blessing"]["baseline"]["location"] is None
    assert (registry / "tiny" / "1" / "saved_model" / "saved_model.pb").exists()
    # The KFP artifacts: Metrics and ClassificationMetrics are metadata (kfp.local's executor output), the report a page.
    outputs = json.loads((tmp_path / "run1" / "evaluator" / "executor_output.json").read_text())
    assert outputs["parameterValues"] == {"Output": True}
    logged = outputs["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert logged["mean_iou"] == pytest.approx(first["metrics"]["eval"]["mean_iou"]) and "iou_background" in logged and "pixel_accuracy" in logged
    matrix = outputs["artifacts"]["confusion_matrix"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert [spec["displayName"] for spec in matrix["annotationSpecs"]] == raw["classes"] and len(matrix["rows"]) == len(raw["classes"])
    page = (tmp_path / "run1" / "evaluator" / "report").read_text()
    assert "Built inside the evaluator task" in page and "min_mean_iou" in page and "Per-class IoU" in page
    # The training curves and data statistics come from the evaluator's extra inputs; only the exports and summary are missing.
    assert page.count("not available") == 2 and "the run has no exporter/exports" in page and "the run has no summary.json" in page

    second = _worse_run(config, raw, tmp_path / "run2", capsys)
    assert second["metrics"]["eval"]["baseline"]["mean_iou"] == pytest.approx(first["metrics"]["eval"]["mean_iou"], abs=1e-6)  # the same model, the same images
    assert sorted(path.name for path in (registry / "tiny").iterdir()) == ["1", "_aliases"]
