"""End-to-end runs on the real datasets in ../shared/datasets (slow: `make test-slow`).
They skip with a clear reason when that folder is absent."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from segflow.cli import main
from tests.conftest import require_dataset

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.realdata]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_isbi2012_int8_within_002_of_float(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_dataset("isbi2012_membrane")
    monkeypatch.chdir(REPO)  # the shipped config's paths are relative to the repository root
    run = tmp_path / "isbi"
    assert main(["run", "configs/isbi2012.yaml", "-o", str(run), "--set", f"push.registry={tmp_path / 'registry'}"]) == 0
    summary = _summary(run)
    assert summary["counts"] == {"examples_in": 30, "examples_written": 30, "quarantined": 0, "skipped": 0, "train_examples": summary["counts"]["train_examples"], "eval_examples": summary["counts"]["eval_examples"]}
    float_iou = summary["metrics"]["eval"]["mean_iou"]
    assert float_iou > 0.6, "a U-Net should separate membranes from cell interiors"
    assert abs(summary["exports"]["tflite_int8"]["mean_iou"] - float_iou) <= 0.02
    assert abs(summary["exports"]["tflite_fp32"]["mean_iou"] - float_iou) <= 0.001


def test_camvid_subset_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """75 CamVid pairs (60 for training, 15 eval by the hash split), 11 classes, void (11) ignored, 192x256x3."""
    camvid = require_dataset("camvid")
    subset = tmp_path / "camvid"
    for folder in ("train", "trainannot"):
        (subset / folder).mkdir(parents=True)
    for name in sorted(os.listdir(camvid / "train"))[:75]:
        (subset / "train" / name).symlink_to(camvid / "train" / name)
        (subset / "trainannot" / name).symlink_to(camvid / "trainannot" / name)
    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    overrides = [
        f"dataset.images={subset / 'train'}", f"dataset.masks={subset / 'trainannot'}", "dataset.eval=null", "dataset.test=null",
        "shape=[192, 256, 3]", "stages.0.epochs=8", f"push.registry={tmp_path / 'registry'}",
    ]
    assert main(["run", "configs/camvid.yaml", "-o", str(run), *[arg for o in overrides for arg in ("--set", o)]]) == 0
    summary = _summary(run)
    assert summary["status"] == "succeeded" and summary["counts"]["examples_written"] == 75
    metrics = summary["metrics"]["eval"]
    assert len(metrics["per_class_iou"]) == 11
    assert metrics["pixels"] < summary["counts"]["eval_examples"] * 360 * 480  # void pixels are not scored
    assert summary["exports"]["tflite_int8"]["bytes"] < summary["exports"]["tflite_fp32"]["bytes"]
