"""Evaluator: per-class metrics of the trained model on the eval split, and the blessing.

The model is evaluated through `serving_default`, the signature users call (raw pixels
in, mask out, preprocessing and TFT graph inside), at each image's original size, so the
figures are what a user of the served model gets.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from segflow.config import ExperimentConfig
from segflow.evaluation import evaluate
from segflow.io import atomic_dir, read_json, write_json
from segflow.runtime import log
from segflow.serving import SERVING_SUBDIR, ServingSpec, serving_mask_predictor

METRICS_FILE = "metrics.json"
BLESSED, NOT_BLESSED = "BLESSED", "NOT_BLESSED"


def run(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    metrics_dir: str | os.PathLike[str],
    blessing_dir: str | os.PathLike[str],
) -> dict[str, Any]:
    serving = Path(model_dir) / SERVING_SUBDIR
    report = evaluate(serving_mask_predictor(serving), examples_dir, "eval", ServingSpec.load(serving))
    threshold = config.evaluation.min_mean_iou
    blessed = report["mean_iou"] is not None and report["mean_iou"] >= threshold
    with atomic_dir(metrics_dir) as out:
        write_json(out / METRICS_FILE, report)
    with atomic_dir(blessing_dir) as out:
        (out / (BLESSED if blessed else NOT_BLESSED)).write_text(f"mean_iou {report['mean_iou']:.4f}, threshold {threshold}\n")
    per_class = ", ".join(f"{name} {iou:.3f}" if iou == iou else f"{name} n/a" for name, iou in report["per_class_iou"].items())
    log(f"evaluator: mean IoU {report['mean_iou']:.4f} ({per_class}); {'BLESSED' if blessed else 'NOT blessed'} (threshold {threshold})")
    return report


def is_blessed(blessing_dir: str | os.PathLike[str]) -> bool:
    return (Path(blessing_dir) / BLESSED).exists()


def read_metrics(metrics_dir: str | os.PathLike[str]) -> dict[str, Any]:
    return read_json(Path(metrics_dir) / METRICS_FILE)
