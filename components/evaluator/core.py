"""Evaluator: metrics of the trained model on the eval split (and the test split when the
examples have one), overall and per slice, and the blessing.

The model is evaluated through `serving_default`, the signature users call (raw pixels
in, mask out, preprocessing and TFT graph inside), at each image's original size, so the
figures are what a user of the served model gets. A Beam pipeline (segflow.beam_evaluation,
the `beam` section's runner) scores batches of examples and TFMA's evaluator sums their
per-image confusion matrices per slice; the blessing is TFMA's validator on the value
threshold `evaluation.min_mean_iou` (overall eval slice).

Outputs (the `evaluation` artifact): metrics.json (the eval split overall: what summary.json,
the pusher and scripts read), test_metrics.json (the test split overall, when there is one),
slices.json (every split's slices), and per split a TFMA output
folder `Split-<split>/` (metrics-*.tfrecord, validations.tfrecord, eval_config.json:
`tfma.load_eval_result` reads it) with `per_image.jsonl`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from segflow.beam_evaluation import EvalSettings, ServedModelLoader, default_slicing_specs, eval_config, run_pipeline
from segflow.config import EvaluationConfig, ExperimentConfig
from segflow.examples import split_dir
from segflow.io import atomic_dir, read_json, write_json
from segflow.runtime import beam_options, log
from segflow.storage import localized
from segflow.serving import SERVING_SUBDIR, ServingSpec

METRICS_FILE = "metrics.json"
SLICES_FILE = "slices.json"
BLESSED, NOT_BLESSED = "BLESSED", "NOT_BLESSED"
SPLITS = ("eval", "test")  # test only when ExampleGen wrote one
TEST_METRICS_FILE = "test_metrics.json"
FOLD_EXAMPLES = "fold_examples"  # a k-fold evaluator's view of the Examples, beside its outputs while it runs


def run(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    metrics_dir: str | os.PathLike[str],
    blessing_dir: str | os.PathLike[str],
    fold: int | None = None,
) -> dict[str, Any]:
    """Evaluate the model, write the metrics and the blessing. `fold` (k-fold runs): the eval
    split is that fold (the examples its trainer did not see), the test split as it is."""
    if fold is not None:
        from segflow.components.example_gen.core import write_fold_view

        view = Path(metrics_dir).parent / FOLD_EXAMPLES
        with localized(examples_dir) as local_examples:
            write_fold_view(local_examples, fold, view)
        try:
            return run(config, view, model_dir, metrics_dir, blessing_dir)
        finally:
            shutil.rmtree(view, ignore_errors=True)
    import tensorflow_model_analysis as tfma

    serving = Path(model_dir) / SERVING_SUBDIR
    spec = ServingSpec.load(serving)
    evaluation = config.evaluation
    settings = eval_settings(evaluation, config.dataset.group_by, spec)
    splits = {}
    for split in SPLITS:
        if split == "eval" or split_dir(examples_dir, split).exists():
            threshold = evaluation.min_mean_iou if split == "eval" else None  # the blessing is the eval split's
            splits[split] = eval_config(slicing_specs(evaluation, examples_dir, split, settings), settings.class_names, settings.threshold_steps, threshold)
    scratch = Path(tempfile.mkdtemp(prefix="segflow-evaluator-"))
    try:
        with atomic_dir(metrics_dir) as out:
            options = beam_options(config.beam, scratch)
            slices = run_pipeline(ServedModelLoader(serving), examples_dir, splits, settings, evaluation.batch, options, out, str(serving))
            overall = next(entry["metrics"] for entry in slices["eval"] if not entry["slice_key"])
            validation = tfma.load_validation_result(str(split_dir(out, "eval")))
            write_json(out / SLICES_FILE, slices)
            write_json(out / METRICS_FILE, summary_metrics(overall))
            if "test" in slices:
                write_json(out / TEST_METRICS_FILE, summary_metrics(next(entry["metrics"] for entry in slices["test"] if not entry["slice_key"])))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = read_metrics(metrics_dir)
    blessed = validation.validation_ok
    threshold = evaluation.min_mean_iou
    mean_iou = report["mean_iou"]
    with atomic_dir(blessing_dir) as out:
        (out / (BLESSED if blessed else NOT_BLESSED)).write_text(f"mean_iou {mean_iou if mean_iou is None else format(mean_iou, '.4f')}, threshold {threshold}\n")
    per_class = ", ".join(f"{name} {iou:.3f}" if iou is not None else f"{name} n/a" for name, iou in report["per_class_iou"].items())
    sliced = sum(len(entries) - 1 for entries in slices.values())
    log(
        f"evaluator: mean IoU {mean_iou if mean_iou is None else format(mean_iou, '.4f')} ({per_class}), boundary F1 "
        f"{report['boundary_f1'] if report['boundary_f1'] is None else format(report['boundary_f1'], '.3f')}; {sliced} slices over "
        f"{', '.join(splits)}; {'BLESSED' if blessed else 'NOT blessed'} (threshold {threshold})"
    )
    return report


def eval_settings(evaluation: EvaluationConfig, group_by: str | None, spec: ServingSpec) -> EvalSettings:
    """What the per-image step needs, from the config's `evaluation` section, dataset.group_by
    (the `source` slice) and the served model."""
    return EvalSettings(
        class_names=spec.class_names,
        ignore_index=spec.ignore_index,
        boundary_tolerance=float(evaluation.boundary_tolerance),
        threshold_steps=evaluation.threshold_steps if len(spec.class_names) == 2 else 0,
        image_size_buckets=tuple(evaluation.image_size_buckets),
        object_size_buckets=tuple(evaluation.object_size_buckets),
        group_by=group_by,
        flip_tta=evaluation.flip_tta,
    )


def slicing_specs(evaluation: EvaluationConfig, examples_dir: str | os.PathLike[str], split: str, settings: EvalSettings) -> list[dict[str, Any]]:
    """The configured slicing specs, or the default ones for the split's features."""
    configured = evaluation.slicing_specs
    return [entry.model_dump() for entry in configured] if configured is not None else default_slicing_specs(examples_dir, split, settings)


def summary_metrics(overall: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: the eval split's overall metrics, with the threshold sweep (binary tasks)
    reduced to its best threshold (the whole curve is in slices.json)."""
    metrics = {key: value for key, value in overall.items() if key != "threshold_sweep"}
    if "threshold_sweep" in overall:
        metrics["best_threshold"] = overall["threshold_sweep"]["best_threshold"]
        metrics["best_threshold_mean_iou"] = overall["threshold_sweep"]["best_mean_iou"]
    return metrics


def is_blessed(blessing_dir: str | os.PathLike[str]) -> bool:
    return (Path(blessing_dir) / BLESSED).exists()


def read_metrics(metrics_dir: str | os.PathLike[str]) -> dict[str, Any]:
    return read_json(Path(metrics_dir) / METRICS_FILE)


def read_test_metrics(metrics_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The test split's overall metrics, None when the examples have no test split."""
    path = Path(metrics_dir) / TEST_METRICS_FILE
    return read_json(path) if path.exists() else None


def read_slices(metrics_dir: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """split -> [{split, slice, slice_key, metrics}], the overall slice first."""
    return read_json(Path(metrics_dir) / SLICES_FILE)
