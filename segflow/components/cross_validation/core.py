"""CrossValidation: what a k-fold run measured, and the ensemble of its fold models.

Each fold's evaluator scored its model on the fold its trainer did not see. This step
reads those evaluations and reports every fold, the mean and standard deviation of their
mean IoU, and the pooled out-of-fold metrics (from the sum of the folds' confusion matrices:
every example scored once, by the model that did not train on it). When the dataset has a
test split, the ensemble of the fold models (mean of their probabilities, through each
model's `serving_default`, at each image's original size) is evaluated on it with the
evaluator's Beam pipeline; the single models' test figures are in their evaluations.

Outputs (the `evaluation` artifact): metrics.json (pooled out-of-fold metrics plus the
fold statistics: what summary.json reads as the eval metrics), folds.json (each fold's eval
and test metrics), and with a test split test_metrics.json, slices.json and `Split-test/`
(TFMA output and per_image.jsonl) of the ensemble.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from segflow.components.evaluator.core import (
    TEST_METRICS_FILE,
    eval_settings,
    read_metrics,
    read_test_metrics,
    slicing_specs,
    summary_metrics,
)
from segflow.config.experiment import ExperimentConfig
from segflow.data.examples import split_dir
from segflow.evaluate.beam_evaluation import (
    BatchPredictor,
    ServedModelLoader,
    eval_config,
    run_pipeline,
)
from segflow.evaluate.evaluation import METRICS_FILE, SLICES_FILE
from segflow.export.serving import SERVING_SUBDIR, ServingSpec
from segflow.model.metrics import matrix_report
from segflow.utils.io import atomic_dir, read_json, write_json
from segflow.utils.runtime import beam_options, log

FOLDS_FILE = "folds.json"


class EnsembleLoader:
    """Loads every fold's served model in a worker; the ensemble's probabilities are their mean."""

    def __init__(self, serving_dirs: list[str]) -> None:
        self.loaders = [ServedModelLoader(directory) for directory in serving_dirs]

    def __call__(self) -> BatchPredictor:
        members = [loader() for loader in self.loaders]

        def predict(images: np.ndarray) -> np.ndarray:
            return np.mean([member(images) for member in members], axis=0)

        return predict


def fold_statistics(per_fold: list[dict[str, Any]], class_names: list[str]) -> dict[str, Any]:
    """Pooled out-of-fold metrics (summed confusion matrices) and the folds' mean IoU mean and
    standard deviation (sample std; 0 for one fold)."""
    matrix = np.sum([np.array(entry["eval"]["confusion_matrix"], np.int64) for entry in per_fold], axis=0)
    ious = [entry["eval"]["mean_iou"] for entry in per_fold]
    pooled = matrix_report(matrix, class_names)
    pooled.update(
        examples=sum(entry["eval"]["examples"] for entry in per_fold),
        folds=[entry["fold"] for entry in per_fold],
        fold_mean_iou=ious,
        mean_iou_fold_mean=statistics.fmean(ious),
        mean_iou_fold_std=statistics.stdev(ious) if len(ious) > 1 else 0.0,
    )
    return pooled


def run(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    model_dirs: list[str],
    evaluation_dirs: list[str],
    evaluation_out: str | os.PathLike[str],
) -> dict[str, Any]:
    folds = config.dataset.trained_folds()
    if not (len(folds) == len(model_dirs) == len(evaluation_dirs)):
        raise ValueError(f"cross_validation: {len(model_dirs)} models and {len(evaluation_dirs)} evaluations for the {len(folds)} trained folds {folds}")
    spec = ServingSpec.load(Path(model_dirs[0]) / SERVING_SUBDIR)
    class_names = list(spec.class_names)
    per_fold = [
        {"fold": fold, "eval": read_metrics(evaluation), "test": read_test_metrics(evaluation)} for fold, evaluation in zip(folds, evaluation_dirs)
    ]
    pooled = fold_statistics(per_fold, class_names)
    ensemble = _ensemble_on_test(config, examples_dir, model_dirs, spec) if split_dir(examples_dir, "test").is_dir() else None
    with atomic_dir(evaluation_out) as out:
        write_json(out / METRICS_FILE, pooled)
        write_json(out / FOLDS_FILE, per_fold)
        if ensemble is not None:
            slices, ensemble_dir = ensemble
            for entry in Path(ensemble_dir).iterdir():
                shutil.move(str(entry), out / entry.name)
            shutil.rmtree(ensemble_dir, ignore_errors=True)
            write_json(out / SLICES_FILE, slices)
            write_json(out / TEST_METRICS_FILE, summary_metrics(next(entry["metrics"] for entry in slices["test"] if not entry["slice_key"])))
    folds_text = ", ".join(f"fold {entry['fold']} {entry['eval']['mean_iou']:.4f}" for entry in per_fold)
    message = (
        f"cross_validation: {len(folds)} folds, mean IoU {pooled['mean_iou_fold_mean']:.4f} +- {pooled['mean_iou_fold_std']:.4f} ({folds_text}); "
        f"pooled out-of-fold mean IoU {pooled['mean_iou']:.4f} on {pooled['examples']} examples"
    )
    if ensemble is not None:
        test = read_json(Path(evaluation_out) / TEST_METRICS_FILE)
        singles = ", ".join(f"{entry['test']['mean_iou']:.4f}" for entry in per_fold if entry["test"])
        message += f"; test: ensemble mean IoU {test['mean_iou']:.4f} on {test['examples']} examples (single folds {singles})"
    log(message)
    return pooled


def _ensemble_on_test(
    config: ExperimentConfig, examples_dir: str | os.PathLike[str], model_dirs: list[str], spec: ServingSpec
) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """The ensemble's slices on the test split and the scratch folder holding its TFMA output."""
    settings = eval_settings(config.evaluation, config.dataset.group_by, spec)
    test = eval_config(slicing_specs(config.evaluation, examples_dir, "test", settings), settings.class_names, settings.threshold_steps)
    loader: Callable[[], BatchPredictor] = EnsembleLoader([str(Path(model) / SERVING_SUBDIR) for model in model_dirs])
    scratch = Path(tempfile.mkdtemp(prefix="segflow-cross-validation-"))
    out = Path(tempfile.mkdtemp(prefix="segflow-ensemble-"))
    try:
        slices = run_pipeline(
            loader, examples_dir, {"test": test}, settings, config.evaluation.batch,
            beam_options(config.beam, scratch), out, f"ensemble of {len(model_dirs)} fold models",
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return slices, str(out)
