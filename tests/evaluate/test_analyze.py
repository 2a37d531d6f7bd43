"""`segflow analyze`: config diff, metrics (folds averaged), ranking, console/CSV/HTML.

Most tests write run folders directly (config.yaml from a real validated config, the
summary.json and history.csv a run writes); the last one runs the DAG twice."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from segflow.evaluate.analyze import compare, config_diff, flatten, load_runs, metric_sections, run_history
from segflow.cli import main
from segflow.config.experiment import ExperimentConfig
from segflow.utils.io import write_json

from tests.conftest import tiny_raw_config


def _fake_run(folder: Path, config: ExperimentConfig, metrics: dict[str, Any], epochs: int = 2) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config.to_yaml())
    write_json(folder / "summary.json", {"status": "succeeded", "blessed": True, "seconds": 12.5, "data_fingerprint": "f" * 64, "metrics": metrics})
    history = folder / "trainer" / "model_run" / "history.csv"
    history.parent.mkdir(parents=True)
    rows = [f"{epoch},{1.0 - epoch * 0.1},{0.3 + epoch * 0.1},{0.9 - epoch * 0.1},{0.25 + epoch * 0.1}" for epoch in range(epochs)]
    history.write_text("epoch,loss,mean_iou,val_loss,val_mean_iou\n" + "\n".join(rows) + "\n")
    return folder


def _eval(mean: float, circle: float) -> dict[str, Any]:
    return {"mean_iou": mean, "pixel_accuracy": 0.9, "per_class_iou": {"background": 0.9, "circle": circle}}


def test_flatten_indexes_lists_of_mappings_only() -> None:
    flat = flatten({"shape": [32, 32, 3], "stages": [{"epochs": 1}, {"epochs": 2}], "model": {"depth": 2}, "augmentation": {}, "qat": None})
    assert flat == {"shape": [32, 32, 3], "stages.0.epochs": 1, "stages.1.epochs": 2, "model.depth": 2, "augmentation": {}, "qat": None}


def test_diff_has_only_the_keys_that_differ_and_runs_are_ranked(tmp_path: Path, make_config: Callable[..., ExperimentConfig]) -> None:
    low = _fake_run(tmp_path / "sweep" / "lr-low", make_config(), {"eval": _eval(0.4, 0.2)})
    high = _fake_run(
        tmp_path / "sweep" / "lr-high",
        make_config(stages=[{"epochs": 1, "learning_rate": 0.01}], qat={"epochs": 1}),
        {"eval": _eval(0.6, 0.5), "test": _eval(0.55, 0.45)},
        epochs=3,
    )
    runs = load_runs([tmp_path / "sweep"])  # a folder of run folders
    assert sorted(run.path for run in runs) == sorted([low.resolve(), high.resolve()])
    comparison = compare(runs)
    assert [run.label for run in comparison.runs] == ["lr-high", "lr-low"]  # best eval mean IoU first
    assert comparison.diff == {"stages.0.learning_rate": [0.01, 0.003], "qat.epochs": [1, "-"], "qat.learning_rate": [0.0001, "-"]}
    assert comparison.metrics["eval.mean_iou"] == [0.6, 0.4] and comparison.metrics["eval.iou.circle"] == [0.5, 0.2]
    assert comparison.metrics["test.mean_iou"] == [0.55, None]
    assert comparison.facts["epochs"] == [3, 2]
    # Ranked by another metric; a run without it goes last.
    assert [run.label for run in compare(runs, "test.mean_iou").runs] == ["lr-high", "lr-low"]
    assert [run.label for run in compare(runs, "iou.circle").runs] == ["lr-high", "lr-low"]


def test_same_config_has_no_diff_and_same_names_are_told_apart(tmp_path: Path, make_config: Callable[..., ExperimentConfig]) -> None:
    first = _fake_run(tmp_path / "a" / "run", make_config(), {"eval": _eval(0.4, 0.2)})
    second = _fake_run(tmp_path / "b" / "run", make_config(), {"eval": _eval(0.5, 0.3)})
    comparison = compare(load_runs([first, second, first]))  # a folder given twice counts once
    assert comparison.diff == {} and [run.label for run in comparison.runs] == ["b/run", "a/run"]


def test_fold_metrics_are_averaged() -> None:
    """A summary may hold a list of per-fold sections, or `metrics.folds`: both averaged."""
    folds = [_eval(0.4, 0.2), {"mean_iou": 0.6, "per_class_iou": {"background": 0.8, "circle": None}}]
    as_list = metric_sections({"metrics": {"eval": folds}})
    as_folds = metric_sections({"metrics": {"folds": [{"eval": fold} for fold in folds]}})
    for sections in (as_list, as_folds):
        section = sections["eval"]
        assert section["folds"] == 2 and section["mean_iou"] == pytest.approx(0.5) and section["pixel_accuracy"] == pytest.approx(0.9)
        assert section["per_class_iou"] == pytest.approx({"background": 0.85, "circle": 0.2})  # None does not count
    # A k-fold run's summary: the pooled out-of-fold section is the run's, beside its folds.
    pooled = {**_eval(0.52, 0.3), "mean_iou_fold_mean": 0.5, "mean_iou_fold_std": 0.1}
    sections = metric_sections({"metrics": {"eval": pooled, "folds": [{"fold": index, "eval": fold} for index, fold in enumerate(folds)]}})
    assert sections["eval"] == {**pooled, "folds": 2}


def test_a_k_fold_runs_histories_are_averaged(tmp_path: Path) -> None:
    for fold, rows in ((0, ["0,1.0", "1,0.5"]), (1, ["0,0.6"])):  # fold 1 stopped early
        history = tmp_path / "trainer" / f"fold-{fold}" / "model_run" / "history.csv"
        history.parent.mkdir(parents=True)
        history.write_text("epoch,loss\n" + "\n".join(rows) + "\n")
    assert run_history(tmp_path) == {"epoch": [0.0, 1.0], "loss": [pytest.approx(0.8), 0.5]}


def test_cli_writes_console_csv_and_self_contained_html(
    tmp_path: Path, make_config: Callable[..., ExperimentConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    first = _fake_run(tmp_path / "seed-1", make_config(seed=1), {"eval": [_eval(0.4, 0.2), _eval(0.6, 0.4)]})
    second = _fake_run(tmp_path / "seed-2", make_config(seed=2), {"eval": _eval(0.45, 0.3)})
    assert main(["analyze", str(first), str(second), "--csv", str(tmp_path / "runs.csv"), "--html", str(tmp_path / "runs.html")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^seed\s+1\s+2$", out, re.M)  # seed-1 first: its folds average 0.5
    assert re.search(r"^eval\.mean_iou\s+0\.5000\s+0\.4500$", out, re.M) and re.search(r"^eval\.folds\s+2\s+-$", out, re.M)
    rows = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert [row["run"] for row in rows] == ["seed-1", "seed-2"] and [row["config.seed"] for row in rows] == ["1", "2"]
    assert float(rows[0]["eval.iou.circle"]) == pytest.approx(0.3) and rows[1]["eval.folds"] == ""
    page = (tmp_path / "runs.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # per-class bars, training curves
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing loaded from elsewhere


def test_cli_names_a_folder_without_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(tmp_path)]) == 2
    assert "neither a run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_two_real_runs_differing_in_the_learning_rate(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The DAG twice through the CLI (1 epoch on the tiny data): analyze shows exactly the
    changed key and both runs' metrics; each run has its tracking.json."""
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_raw_config(tiny_data, export=["saved_model"], push={"registry": str(tmp_path / "registry")})))
    for name, rate in (("slow", "0.001"), ("fast", "0.01")):
        assert main(["run", str(config), "-o", str(tmp_path / "runs" / name), "--set", f"stages.0.learning_rate={rate}"]) == 0
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "runs"), "--csv", str(tmp_path / "runs.csv")]) == 0
    out = capsys.readouterr().out
    runs = load_runs([tmp_path / "runs"])
    assert config_diff(runs) == {"stages.0.learning_rate": [0.01 if run.label == "fast" else 0.001 for run in runs]}
    diff_table = out.split("config keys that differ\n")[1].split("\n\n")[0].splitlines()[2:]
    assert len(diff_table) == 1 and diff_table[0].split()[0] == "stages.0.learning_rate"
    rows = {row["run"]: row for row in csv.DictReader((tmp_path / "runs.csv").open())}
    for name in ("slow", "fast"):
        summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
        assert float(rows[name]["eval.mean_iou"]) == summary["metrics"]["eval"]["mean_iou"]
        assert f"{summary['metrics']['eval']['mean_iou']:.4f}" in out
        record = json.loads((tmp_path / "runs" / name / "tracking.json").read_text())
        assert record["config_hash"] == summary["config_hash"] == summary["tracking"]["config_hash"]
        assert record["data_fingerprint"] == summary["data_fingerprint"] and record["metrics"] == summary["metrics"]
        assert (tmp_path / "runs" / name / record["artifacts"]["exports"]["saved_model"]).is_dir()
        assert record["artifacts"]["history"] == "trainer/model_run/history.csv"
    hashes = {json.loads((tmp_path / "runs" / name / "tracking.json").read_text())["config_hash"] for name in ("slow", "fast")}
    assert len(hashes) == 2
