"""Evaluator: metrics of the trained model on the eval split (and the test split when the
examples have one), overall and per slice, and the blessing.

The model is evaluated through `serving_default`, the signature users call (raw pixels
in, mask out, preprocessing and TFT graph inside), at each image's original size, so the
figures are what a user of the served model gets. A Beam pipeline (segflow.evaluate.beam_evaluation,
the `beam` section's runner) scores batches of examples and TFMA's evaluator sums their
per-image confusion matrices per slice.

The blessing is TFMA's validator on the overall eval slice: value thresholds
(`evaluation.min_mean_iou`, `evaluation.min_class_iou`) and, against the baseline, the change
threshold `evaluation.change_thresholds.max_mean_iou_drop`. The baseline is the `current`
committed version of this config's `name` in `push.registry` (pushed versions are blessed by
construction): its `saved_model` export, which is the served SavedModel (export formats
without `saved_model` leave no baseline to compare with). Candidate and baseline are scored
on the same images in the same Beam pipeline (TFMA model comparison, see
segflow.evaluate.beam_evaluation). With no such version (first run), or no change threshold
configured (the baseline is then not evaluated), only the value thresholds apply.
A k-fold evaluator measures a fold, which is never pushed: it has no baseline.

Outputs (the `evaluation` artifact): metrics.json (the eval split overall: what summary.json,
the pusher and scripts read; with a baseline, its figures under `baseline`), test_metrics.json
(the test split overall, when there is one), slices.json (every split's slices, with
`baseline_metrics` beside `metrics`), and per split a TFMA output folder `Split-<split>/`
(metrics-*.tfrecord, validations.tfrecord, eval_config.json: `tfma.load_eval_result` reads
it) with `per_image.jsonl`. The `blessing` artifact: the BLESSED or NOT_BLESSED marker and
blessing.json (every threshold checked: its value, the baseline's, passed or not).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from segflow.config.experiment import EvaluationConfig, ExperimentConfig
from segflow.data.examples import split_dir
from segflow.evaluate.beam_evaluation import (
    BlessingThresholds,
    EvalSettings,
    ServedModelLoader,
    default_slicing_specs,
    eval_config,
    run_pipeline,
)
from segflow.evaluate.evaluation import (
    BLESSED,
    BLESSING_FILE,
    METRICS_FILE,
    NOT_BLESSED,
    SLICES_FILE,
)
from segflow.export.serving import SERVING_SUBDIR, ServingSpec
from segflow.utils import storage
from segflow.utils.io import atomic_dir, read_json, write_json
from segflow.utils.runtime import beam_options, log
from segflow.utils.storage import localized

SPLITS = ("eval", "test")  # test only when ExampleGen wrote one
TEST_METRICS_FILE = "test_metrics.json"
FOLD_EXAMPLES = "fold_examples"  # a k-fold evaluator's view of the Examples, beside its outputs while it runs
BASELINE_EXPORT = "saved_model"  # the export that is the served SavedModel (segflow.export.exporters)


def run(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    metrics_dir: str | os.PathLike[str],
    blessing_dir: str | os.PathLike[str],
    fold: int | None = None,
) -> dict[str, Any]:
    """Evaluate the model (against the registry's latest version, when there is one), write
    the metrics and the blessing. `fold` (k-fold runs): the eval split is that fold (the
    examples its trainer did not see), the test split as it is, and no baseline."""
    if fold is not None:
        from segflow.components.example_gen.core import fold_view

        with fold_view(examples_dir, fold, Path(metrics_dir).parent / FOLD_EXAMPLES) as view:
            return _evaluate(config, view, model_dir, metrics_dir, blessing_dir, None)
    if config.evaluation.change_thresholds.max_mean_iou_drop is None:  # nothing to compare: the baseline is not evaluated
        baseline = {"version": None, "location": None, "reason": "no change threshold (evaluation.change_thresholds)"}
    else:
        baseline = find_baseline(config.push.registry, config.name)
    if baseline["location"] is None:
        return _evaluate(config, examples_dir, model_dir, metrics_dir, blessing_dir, baseline)
    with localized(baseline["location"]) as local_baseline:
        return _evaluate(config, examples_dir, model_dir, metrics_dir, blessing_dir, baseline, Path(local_baseline))


def find_baseline(registry: str, name: str) -> dict[str, Any]:
    """The registry's `current` version of `name` (the one that serves) as {version, location
    of its served SavedModel}; location None (and `reason`) when there is nothing to compare with."""
    from segflow.export.exporters import EXPORTS_FILE
    from segflow.export.model_registry import read_aliases, version_location

    version = read_aliases(registry, name).current
    if version is None:
        return {"version": None, "location": None, "reason": f"no committed version of {name!r} in {registry}"}
    folder = version_location(registry, name, version)
    exports = json.loads(storage.read_bytes(storage.join(folder, EXPORTS_FILE)))
    if BASELINE_EXPORT not in exports:
        return {"version": version, "location": None, "reason": f"version {version} has no {BASELINE_EXPORT} export (the served SavedModel) to evaluate"}
    return {"version": version, "location": storage.join(folder, exports[BASELINE_EXPORT]["file"])}


def blessing_thresholds(evaluation: EvaluationConfig, class_names: tuple[str, ...]) -> BlessingThresholds:
    """The config's thresholds with per-class ones by class index (a single number: every class)."""
    configured = evaluation.min_class_iou
    by_name = {} if configured is None else configured if isinstance(configured, dict) else dict.fromkeys(class_names, configured)
    unknown = sorted(set(by_name) - set(class_names))
    if unknown:
        raise ValueError(f"evaluation.min_class_iou names {', '.join(unknown)}, not classes of the model ({', '.join(class_names)})")
    return BlessingThresholds(
        evaluation.min_mean_iou, {class_names.index(name): bound for name, bound in by_name.items()}, evaluation.change_thresholds.max_mean_iou_drop
    )


def _evaluate(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    metrics_dir: str | os.PathLike[str],
    blessing_dir: str | os.PathLike[str],
    baseline: dict[str, Any] | None,
    baseline_serving: Path | None = None,
) -> dict[str, Any]:
    """The evaluation proper; `baseline_serving`: a local copy of the baseline's served model."""
    import tensorflow_model_analysis as tfma

    serving = Path(model_dir) / SERVING_SUBDIR
    spec = ServingSpec.load(serving)
    evaluation = config.evaluation
    settings = eval_settings(evaluation, config.dataset.group_by, spec)
    if baseline_serving is not None and baseline is not None:
        baseline_classes = ServingSpec.load(baseline_serving).class_names
        if baseline_classes != spec.class_names:
            baseline = {**baseline, "location": None, "reason": f"version {baseline['version']} predicts other classes ({', '.join(baseline_classes)})"}
            baseline_serving = None
    thresholds = blessing_thresholds(evaluation, settings.class_names)
    compared = baseline_serving is not None
    splits = {}
    for split in SPLITS:
        if split == "eval" or split_dir(examples_dir, split).exists():
            blessing = thresholds if split == "eval" else None  # the blessing is the eval split's
            specs = slicing_specs(evaluation, examples_dir, split, settings)
            splits[split] = eval_config(specs, settings.class_names, settings.threshold_steps, blessing, baseline=compared)
    scratch = Path(tempfile.mkdtemp(prefix="segflow-evaluator-"))
    try:
        with atomic_dir(metrics_dir) as out:
            options = beam_options(config.beam, scratch)
            reference = (ServedModelLoader(baseline_serving), str(baseline["location"])) if compared and baseline is not None else None
            slices = run_pipeline(ServedModelLoader(serving), examples_dir, splits, settings, evaluation.batch, options, out, str(serving), reference)
            overall = {split: next(entry for entry in entries if not entry["slice_key"]) for split, entries in slices.items()}
            validation = tfma.load_validation_result(str(split_dir(out, "eval")))
            write_json(out / SLICES_FILE, slices)
            for split, name in (("eval", METRICS_FILE), ("test", TEST_METRICS_FILE)):
                if split in overall:
                    metrics = summary_metrics(overall[split]["metrics"])
                    if "baseline_metrics" in overall[split]:
                        metrics["baseline"] = {"version": baseline["version"] if baseline else None, **summary_metrics(overall[split]["baseline_metrics"])}
                    write_json(out / name, metrics)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = read_metrics(metrics_dir)
    record = blessing_record(thresholds, settings.class_names, overall["eval"], validation, baseline)
    with atomic_dir(blessing_dir) as out:
        write_json(out / BLESSING_FILE, record)
        (out / (BLESSED if record["blessed"] else NOT_BLESSED)).write_text(blessing_line(record) + "\n")
    mean_iou = report["mean_iou"]
    per_class = ", ".join(f"{name} {iou:.3f}" if iou is not None else f"{name} n/a" for name, iou in report["per_class_iou"].items())
    sliced = sum(len(entries) - 1 for entries in slices.values())
    log(
        f"evaluator: mean IoU {mean_iou if mean_iou is None else format(mean_iou, '.4f')} ({per_class}), boundary F1 "
        f"{report['boundary_f1'] if report['boundary_f1'] is None else format(report['boundary_f1'], '.3f')}; {sliced} slices over "
        f"{', '.join(splits)}; {'BLESSED' if record['blessed'] else 'NOT blessed'}: {blessing_line(record)}"
    )
    return report


def blessing_record(
    thresholds: BlessingThresholds, class_names: tuple[str, ...], overall: dict[str, Any], validation: Any, baseline: dict[str, Any] | None
) -> dict[str, Any]:
    """blessing.json: every threshold checked on the overall eval slice (its value, the
    baseline's, passed or not) and the names of the failed ones. Pass or fail is TFMA's
    validator's verdict (`validation`, a ValidationResult), matched to the thresholds by
    metric key; the values are the slice's metrics (`overall`: metrics, baseline_metrics)."""
    failures = {
        (failure.metric_key.name, failure.metric_key.sub_key.class_id.value if failure.metric_key.HasField("sub_key") else None, failure.metric_key.is_diff)
        for entry in validation.metric_validations_per_slice
        for failure in entry.failures
    }
    own, reference = overall["metrics"], overall.get("baseline_metrics")
    checked = [{"name": "min_mean_iou", "metric": "mean_iou", "bound": thresholds.min_mean_iou, "value": own["mean_iou"], "key": ("mean_iou", None, False)}]
    for class_id, bound in sorted(thresholds.min_class_iou.items()):
        name = class_names[class_id]
        checked.append({"name": f"min_class_iou[{name}]", "metric": f"iou[{name}]", "bound": bound, "value": own["per_class_iou"][name], "key": ("iou", class_id, False)})
    if reference is not None and thresholds.max_mean_iou_drop is not None:
        drop = reference["mean_iou"] - own["mean_iou"]
        checked.append({"name": "max_mean_iou_drop", "metric": "baseline mean_iou - mean_iou", "bound": thresholds.max_mean_iou_drop, "value": drop, "key": ("mean_iou", None, True)})
    records = []
    for entry in checked:
        key = entry.pop("key")
        baseline_value = None
        if reference is not None:
            baseline_value = reference["mean_iou"] if key[0] == "mean_iou" else reference["per_class_iou"][class_names[key[1]]]
        records.append({**entry, "baseline": baseline_value, "passed": key not in failures})
    known = {("mean_iou", None, False), ("mean_iou", None, True), *(("iou", class_id, False) for class_id in thresholds.min_class_iou)}
    failed = [entry["name"] for entry in records if not entry["passed"]] + [f"{name}{'' if class_id is None else f'[{class_id}]'}{' (diff)' if diff else ''}" for name, class_id, diff in sorted(failures - known, key=str)]
    return {
        "blessed": bool(validation.validation_ok),
        "failed": failed,
        "thresholds": records,
        "baseline": baseline,
    }


def blessing_line(record: dict[str, Any]) -> str:
    """One line for logs, the marker file and the CLI: the failed thresholds (or all) with their values."""

    def shown(entry: dict[str, Any]) -> str:
        value = "n/a" if entry["value"] is None or entry["value"] != entry["value"] else f"{entry['value']:.4f}"
        relation = ">" if entry["name"] == "max_mean_iou_drop" else "<"
        verdict = "ok" if entry["passed"] else f"{relation} {entry['bound']}"
        return f"{entry['name']} {value} ({verdict})"

    entries = [entry for entry in record["thresholds"] if not entry["passed"]] or record["thresholds"]
    baseline = record["baseline"]
    against = "" if baseline is None else f"; baseline version {baseline['version']}" if baseline["location"] else f"; no baseline: {baseline['reason']}"
    return ", ".join([shown(entry) for entry in entries] + [name for name in record["failed"] if name not in {entry["name"] for entry in entries}]) + against


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
        tta=evaluation.test_time_views,
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


def read_metrics(metrics_dir: str | os.PathLike[str]) -> dict[str, Any]:
    return read_json(Path(metrics_dir) / METRICS_FILE)


def read_test_metrics(metrics_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The test split's overall metrics, None when the examples have no test split."""
    path = Path(metrics_dir) / TEST_METRICS_FILE
    return read_json(path) if path.exists() else None


def read_slices(metrics_dir: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """split -> [{split, slice, slice_key, metrics}], the overall slice first."""
    return read_json(Path(metrics_dir) / SLICES_FILE)


def log_kfp_metrics(metrics_dir: str | os.PathLike[str], metrics: Any, confusion: Any) -> None:
    """The eval split's figures as KFP Metrics (mean IoU, pixel accuracy, per-class IoU; the
    baseline's mean IoU when compared) and ClassificationMetrics (the confusion matrix), which
    the Kubeflow UI shows. Undefined (NaN) values are left out: KFP metrics are numbers."""
    report = read_metrics(metrics_dir)
    scalars = {"mean_iou": report["mean_iou"], "pixel_accuracy": report["pixel_accuracy"], "boundary_f1": report["boundary_f1"]}
    scalars.update({f"iou_{name}": value for name, value in report["per_class_iou"].items()})
    if "baseline" in report:
        scalars["baseline_mean_iou"] = report["baseline"]["mean_iou"]
    for name, value in scalars.items():
        if value is not None and value == value:
            metrics.log_metric(name, float(value))
    confusion.log_confusion_matrix(list(report["per_class_iou"]), report["confusion_matrix"])
