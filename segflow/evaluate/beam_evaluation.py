"""The evaluator's Beam pipeline: per-image confusion matrices, boundary counts and
probability histograms, summed per slice, so the eval split never has to fit in memory and
runs on the same runners as the data components (`beam` config section).

TFMA runs everything after the model: its SliceKeyExtractor (slicing specs), its
MetricsPlotsAndValidationsEvaluator with the segmentation metrics as one custom TFMA metric
(`SegmentationMetrics`: a preprocessor that hands over each image's stats and a combiner that
sums them), its validator (the blessing's thresholds) and its writers (MetricsForSlice,
ValidationResult, eval_config.json). Per-class values are under a class_id sub key.

With a baseline (the registry's latest version) both models score every image in the same
pipeline: the EvalConfig has two model specs (the baseline's is_baseline), each image's
extract holds both models' stats keyed by model name, and SegmentationMetrics yields one
computation per model name. TFMA then adds the diff metrics (candidate minus baseline) and
checks the change thresholds on them with its own validator. The
per-image step is ours: TFMA's standard inputs are one label and one prediction per
example, and its predictions extractor feeds serialized examples to a signature, while a
mask is a label per pixel at the image's own size and the served model takes decoded pixels.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import apache_beam as beam
import numpy as np
from tensorflow_model_analysis import constants
from tensorflow_model_analysis.metrics import metric_types

from segflow.console import Progress
from segflow.data.examples import deserialize, group_key, scalar_features, split_files
from segflow.model.metrics import (
    ConfusionMatrix,
    boundary_counts,
    boundary_report,
    matrix_report,
    probability_histograms,
    threshold_sweep,
)
from segflow.model.tta import BatchPredictor, with_tta
from segflow.utils.io import _jsonable

STATS_KEY = "stats"
IMAGE_KEY = "image"
METRICS_PREFIX = "metrics"  # TFMA's file names: metrics-*.tfrecord (MetricsForSlice) and
VALIDATIONS_PREFIX = "validations"  # validations.tfrecord (ValidationResult)
PER_IMAGE_FILE = "per_image.jsonl"
EXAMPLE_COUNT = "example_count"  # TFMA's name for the number of examples in a slice
SWEEP_PREFIX = "threshold_sweep/"
DERIVED_FEATURES = ("image_size", "object_size", "mask_empty")
SOURCE_FEATURE = "source"
# height and width are in image_size (a bucket); one slice per distinct size would be per image.
NOT_SLICED_BY_DEFAULT = ("height", "width")
CANDIDATE, BASELINE = "candidate", "baseline"  # TFMA model names when a baseline is evaluated too (else "")


@dataclass(frozen=True)
class BlessingThresholds:
    """The blessing's thresholds on the eval split's overall slice: value thresholds on mean
    IoU and per-class IoU (class index -> lower bound) and, with a baseline, the largest
    allowed mean IoU drop (a TFMA change threshold, HIGHER_IS_BETTER, absolute -drop)."""

    min_mean_iou: float
    min_class_iou: dict[int, float]
    max_mean_iou_drop: float | None


@dataclass(frozen=True)
class EvalSettings:
    """What the per-image step needs (picklable: Beam ships it to workers)."""

    class_names: tuple[str, ...]
    ignore_index: int | None
    boundary_tolerance: float
    threshold_steps: int  # 0: no sweep (more than two labels)
    image_size_buckets: tuple[int, ...]
    object_size_buckets: tuple[float, ...]
    group_by: str | None
    tta: str  # a key of segflow.model.tta.TTA_VIEWS

    @property
    def num_labels(self) -> int:
        return len(self.class_names)


class ServedModelLoader:
    """Loads the served model's `serving_<dtype>` signatures (what users call) in a worker:
    a path travels to workers, a loaded SavedModel does not pickle."""

    def __init__(self, serving_dir: str | os.PathLike[str]) -> None:
        self.serving_dir = str(serving_dir)

    def __call__(self) -> BatchPredictor:
        import tensorflow as tf

        loaded = tf.saved_model.load(self.serving_dir)

        def predict(images: np.ndarray) -> np.ndarray:
            signature = loaded.signatures[f"serving_{images.dtype.name}"]
            return signature(images=tf.constant(images))["probabilities"].numpy()

        predict.keepalive = loaded  # type: ignore[attr-defined]  # the signatures need their SavedModel alive
        return predict


def bucket(value: float, edges: tuple[float, ...], unit: str = "") -> str:
    """The name of `value`'s bucket: `<=e0`, `e0-e1` (above e0, at most e1), ..., `>eN`."""
    for low, high in zip((None, *edges), edges):
        if value <= high:
            return f"<={high:g}{unit}" if low is None else f"{low:g}-{high:g}{unit}"
    return f">{edges[-1]:g}{unit}"


def image_features(mask: np.ndarray, filename: str, record_features: dict[str, Any], settings: EvalSettings) -> dict[str, Any]:
    """The values one example is sliced by: its scalar features, the image-size bucket (longer
    side), the object-size bucket (non-background share of labelled pixels), empty or not,
    and its source (the `dataset.group_by` group) when examples are grouped."""
    labelled = mask != settings.ignore_index if settings.ignore_index is not None else np.ones(mask.shape, bool)
    foreground = int((labelled & (mask > 0)).sum())
    share = foreground / max(int(labelled.sum()), 1)
    features = dict(record_features)
    features["image_size"] = bucket(max(mask.shape), settings.image_size_buckets, "px")
    features["object_size"] = "none" if foreground == 0 else bucket(share, settings.object_size_buckets)
    features["mask_empty"] = "empty" if foreground == 0 else "non-empty"
    if settings.group_by is not None:
        features[SOURCE_FEATURE] = group_key(Path(filename.split("#page")[0]).stem, settings.group_by)
    return features


def image_stats(mask: np.ndarray, probabilities: np.ndarray, settings: EvalSettings) -> dict[str, np.ndarray]:
    """One image's contribution to every metric, as sums: confusion matrix, boundary counts and
    (binary tasks) foreground-probability histograms. ignore_index pixels are in none of them."""
    prediction = probabilities.argmax(axis=-1)
    matrix = ConfusionMatrix(settings.num_labels, settings.ignore_index)
    matrix.update(mask, prediction)
    stats = {
        "examples": np.array(1, np.int64),
        "matrix": matrix.matrix,
        "boundary": boundary_counts(mask, prediction, settings.num_labels, settings.boundary_tolerance, settings.ignore_index),
    }
    if settings.threshold_steps:
        stats["histograms"] = probability_histograms(mask, probabilities[..., 1], settings.threshold_steps, settings.ignore_index)
    return stats


def report(stats: dict[str, np.ndarray], class_names: tuple[str, ...]) -> dict[str, Any]:
    """Every metric of summed stats (one image, one slice or a whole split)."""
    names = list(class_names)
    result = {"examples": int(stats["examples"]), **matrix_report(stats["matrix"], names), **boundary_report(stats["boundary"], names)}
    if "histograms" in stats:
        result["threshold_sweep"] = threshold_sweep(stats["histograms"])
    return result


class PredictAndScoreFn(beam.DoFn):
    """Runs the models (model name -> loader; the first is the candidate) on a batch of
    serialized examples (same-size images in one call), and emits one TFMA extract per image:
    its slicing features, each model's stats and the candidate's own metrics. The models are
    loaded once per worker (DoFn.setup), not per batch."""

    def __init__(self, loaders: dict[str, Callable[[], BatchPredictor]], settings: EvalSettings, split: str) -> None:
        self.loaders = loaders
        self.settings = settings
        self.split = split
        self.predictors: dict[str, BatchPredictor] = {}

    def setup(self) -> None:
        for name, loader in self.loaders.items():
            predict = loader()
            self.predictors[name] = with_tta(predict, self.settings.tta)

    def process(self, records: list[bytes]) -> Iterator[dict[str, Any]]:
        examples = [(deserialize(record), scalar_features(record)) for record in records]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, (example, _) in enumerate(examples):
            groups.setdefault((example.image.shape, example.image.dtype.str), []).append(index)
        candidate = next(iter(self.loaders))
        for indices in groups.values():
            images = np.stack([examples[index][0].image for index in indices])
            probabilities = {name: predict(images) for name, predict in self.predictors.items()}
            for position, index in enumerate(indices):
                example, record_features = examples[index]
                features = image_features(example.mask, example.filename, record_features, self.settings)
                stats = {name: image_stats(example.mask, probs[position], self.settings) for name, probs in probabilities.items()}
                metrics = report(stats[candidate], self.settings.class_names)
                metrics.pop("confusion_matrix")
                metrics.pop("threshold_sweep", None)
                yield {
                    constants.FEATURES_KEY: {name: np.array([value if isinstance(value, (int, float)) else str(value).encode()]) for name, value in features.items()},
                    STATS_KEY: stats,
                    IMAGE_KEY: {"split": self.split, "filename": example.filename, "features": features, **metrics},
                }
        self.counter.add(len(records))

    def start_bundle(self) -> None:
        """A counter per bundle, so that each bundle's count is reported when it ends."""
        self.counter = Progress(f"evaluator: {self.split} split", unit="images")

    def finish_bundle(self) -> None:
        self.counter.flush()


class StatsPreprocessor(metric_types.Preprocessor):
    """TFMA preprocessor: hands the combiner each image's stats of one model instead of TFMA's
    standard inputs (one label and one prediction per example, which a mask is not)."""

    def __init__(self, model_name: str) -> None:
        super().__init__(name=f"StatsPreprocessor_{model_name}")
        self.model_name = model_name

    def process(self, extracts: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
        yield extracts[STATS_KEY][self.model_name]


class SegmentationCombineFn(beam.CombineFn):
    """Sums per-image stats; the output is `report` of the sums (dataset-level metrics, the
    numbers the literature reports, not means of per-image metrics) as TFMA's metrics dict."""

    def __init__(self, class_names: tuple[str, ...], threshold_steps: int, model_name: str = "") -> None:
        self.class_names = class_names
        self.threshold_steps = threshold_steps
        self.model_name = model_name

    def create_accumulator(self) -> dict[str, np.ndarray]:
        labels = len(self.class_names)
        accumulator = {"examples": np.array(0, np.int64), "matrix": np.zeros((labels, labels), np.int64), "boundary": np.zeros((labels, 4), np.int64)}
        if self.threshold_steps:
            accumulator["histograms"] = np.zeros((2, self.threshold_steps), np.int64)
        return accumulator

    def add_input(self, accumulator: dict[str, np.ndarray], stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for key, value in stats.items():
            accumulator[key] = accumulator[key] + value
        return accumulator

    def merge_accumulators(self, accumulators: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        merged = self.create_accumulator()
        for accumulator in accumulators:
            self.add_input(merged, accumulator)
        return merged

    def extract_output(self, accumulator: dict[str, np.ndarray]) -> dict[Any, Any]:
        with np.errstate(all="ignore"):
            return metric_keys(report(accumulator, self.class_names), self.model_name)


def _segmentation_computations(class_names: list[str], threshold_steps: int, model_names: list[str] | None = None) -> Any:
    """One computation per model (TFMA passes the metrics spec's model names) whose keys are
    the metric names themselves (mean_iou, iou/class_id, ...), so thresholds name them as
    users read them."""
    computations = []
    for model_name in model_names or [""]:
        combiner = SegmentationCombineFn(tuple(class_names), threshold_steps, model_name)
        keys = list(combiner.extract_output(combiner.create_accumulator()))
        computations.append(metric_types.MetricComputation(keys=keys, preprocessors=[StatsPreprocessor(model_name)], combiner=combiner))
    return computations


class SegmentationMetrics(metric_types.Metric):
    """The segmentation metrics as one TFMA custom metric (`MetricConfig` class_name
    SegmentationMetrics, this module): TFMA's evaluator slices, combines and validates it."""

    def __init__(self, class_names: list[str], threshold_steps: int) -> None:
        super().__init__(_segmentation_computations, class_names=class_names, threshold_steps=threshold_steps)


def metric_keys(metrics: dict[str, Any], model_name: str = "") -> dict[Any, Any]:
    """A report as TFMA's metrics dict: scalars by name, per-class values under a class_id
    sub key (in class order), the confusion matrix and the sweep's curves as arrays. Keys are
    unweighted (example_weighted None), as TFMA's thresholds on custom metrics are keyed."""

    def key(name: str, class_id: int | None = None) -> Any:
        sub_key = None if class_id is None else metric_types.SubKey(class_id=class_id)
        return metric_types.MetricKey(name=name, model_name=model_name, sub_key=sub_key, example_weighted=None)

    keyed: dict[Any, Any] = {}
    for name, value in metrics.items():
        if isinstance(value, dict) and name.startswith("per_class_"):
            for index, number in enumerate(value.values()):
                keyed[key(name.removeprefix("per_class_"), index)] = number
        elif name == "threshold_sweep":
            for part, number in value.items():
                keyed[key(f"{SWEEP_PREFIX}{part}")] = np.asarray(value[part], np.float64) if isinstance(number, list) else np.nan if number is None else number
        elif name == "confusion_matrix":
            keyed[key(name)] = np.asarray(value, np.int64)
        else:
            keyed[key(EXAMPLE_COUNT if name == "examples" else name)] = value
    return keyed


def report_from_proto(record: Any, class_names: tuple[str, ...], model_name: str = "") -> dict[str, Any]:
    """One model's metrics in a TFMA MetricsForSlice of SegmentationMetrics back as a report
    (the inverse of `metric_keys`); diff metrics are left out."""
    result: dict[str, Any] = {}
    for item in record.metric_keys_and_values:
        if item.key.model_name != model_name or item.key.is_diff:
            continue
        name, value = item.key.name, item.value
        if value.HasField("array_value"):
            array = value.array_value
            numbers = np.array(array.int64_values if array.int64_values else array.float64_values).reshape(tuple(array.shape))
            value = numbers.tolist()
        else:
            value = value.double_value.value
        if item.key.HasField("sub_key"):
            result.setdefault(f"per_class_{name}", {})[class_names[item.key.sub_key.class_id.value]] = value
        elif name.startswith(SWEEP_PREFIX):
            result.setdefault("threshold_sweep", {})[name.removeprefix(SWEEP_PREFIX)] = value
        else:
            result["examples" if name == EXAMPLE_COUNT else name] = int(value) if name in (EXAMPLE_COUNT, "pixels") else value
    for name, values in result.items():  # sub keys come in key order, not class order
        if name.startswith("per_class_"):
            result[name] = {class_name: values[class_name] for class_name in class_names}
    return result


def default_slicing_specs(examples_dir: str | os.PathLike[str], split: str, settings: EvalSettings) -> list[dict[str, Any]]:
    """Overall, source (with group_by), image_size, object_size, mask_empty, and one per scalar
    feature of the split's first example (channels, bit_depth, any metadata column)."""
    import tensorflow as tf

    first = next(iter(tf.data.TFRecordDataset(split_files(examples_dir, split)[:1], compression_type="GZIP")))
    columns = [name for name in sorted(scalar_features(first.numpy())) if name not in NOT_SLICED_BY_DEFAULT]
    derived = ([SOURCE_FEATURE] if settings.group_by is not None else []) + list(DERIVED_FEATURES)
    return [{}] + [{"feature_keys": [name]} for name in derived + [name for name in columns if name not in derived]]


def eval_config(
    slicing_specs: list[dict[str, Any]], class_names: tuple[str, ...], threshold_steps: int, thresholds: BlessingThresholds | None = None, baseline: bool = False
) -> Any:
    """TFMA's EvalConfig of one split: its slicing specs, SegmentationMetrics (of the candidate
    and, with `baseline`, of the baseline model: two model specs) and the blessing's
    `thresholds` on the overall slice, which TFMA's validator checks. A per-class threshold
    is a metrics spec of its own, binarized to that class: TFMA keys a spec's thresholds by
    the spec's sub keys, so one spec would give every class the same bound."""
    from tensorflow_model_analysis.proto import config_pb2

    config = config_pb2.EvalConfig(slicing_specs=[config_pb2.SlicingSpec(**spec) for spec in slicing_specs])
    model_names = [CANDIDATE, BASELINE] if baseline else []
    if baseline:
        config.model_specs.add(name=CANDIDATE)
        config.model_specs.add(name=BASELINE, is_baseline=True)
    metric = SegmentationMetrics(list(class_names), threshold_steps)
    spec = config.metrics_specs.add(model_names=model_names)
    spec.metrics.add(class_name=type(metric).__name__, module=__name__, config=json.dumps(metric.get_config()))
    if thresholds is None:
        return config
    overall = [config_pb2.SlicingSpec()]
    value = config_pb2.MetricThreshold(value_threshold=config_pb2.GenericValueThreshold(lower_bound={"value": thresholds.min_mean_iou}))
    spec.per_slice_thresholds["mean_iou"].thresholds.add(slicing_specs=overall, threshold=value)
    if baseline and thresholds.max_mean_iou_drop is not None:
        change = config_pb2.GenericChangeThreshold(direction=config_pb2.MetricDirection.HIGHER_IS_BETTER, absolute={"value": -thresholds.max_mean_iou_drop})
        spec.per_slice_thresholds["mean_iou"].thresholds.add(slicing_specs=overall, threshold=config_pb2.MetricThreshold(change_threshold=change))
    for class_id, bound in sorted(thresholds.min_class_iou.items()):
        class_spec = config.metrics_specs.add(model_names=model_names, binarize=config_pb2.BinarizationOptions(class_ids={"values": [class_id]}))
        value = config_pb2.MetricThreshold(value_threshold=config_pb2.GenericValueThreshold(lower_bound={"value": bound}))
        class_spec.per_slice_thresholds["iou"].thresholds.add(slicing_specs=overall, threshold=value)
    return config


def run_pipeline(
    loader: Callable[[], BatchPredictor],
    examples_dir: str | os.PathLike[str],
    splits: dict[str, Any],
    settings: EvalSettings,
    batch: int,
    options: Any,
    out_dir: str | os.PathLike[str],
    model_location: str = "<in memory>",
    baseline: tuple[Callable[[], BatchPredictor], str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """One Beam pipeline over every split in `splits` (split -> its `eval_config`). Each split's
    folder `Split-<split>/` under `out_dir` is a TFMA output (metrics-*.tfrecord,
    validations.tfrecord, eval_config.json: `tfma.load_eval_result` reads it) plus
    per_image.jsonl. Returns each split's slices as JSON records, the overall slice first.
    `baseline` (its loader and location; the configs made with baseline=True) scores every
    image too; each slice record then also has the baseline's `baseline_metrics`."""
    from segflow.data.examples import COUNTS_FILE, read_counts

    loaders = {CANDIDATE: loader, BASELINE: baseline[0]} if baseline is not None else {"": loader}
    locations = {CANDIDATE: model_location, BASELINE: baseline[1]} if baseline is not None else {"": model_location}
    out = Path(out_dir)
    # The bars' totals: ExampleGen's counts (an Examples folder without them: unknown).
    counts = read_counts(examples_dir) if (Path(examples_dir) / COUNTS_FILE).exists() else {}
    sizes = {split: counts.get(f"{split}_examples") for split in splits}
    counters = [Progress(f"evaluator: {split} split", sizes[split], "images") for split in splits]  # the console's bars; the DoFns count
    with beam.Pipeline(options=options) as pipeline:
        for split, config in splits.items():
            _evaluate_split(pipeline, examples_dir, split, config, PredictAndScoreFn(loaders, settings, split), batch, out / f"Split-{split}", locations)
    for counter, size in zip(counters, sizes.values()):
        counter.end(done=size)
    return {split: _read_slices(out / f"Split-{split}", split, settings, next(iter(loaders)), baseline is not None) for split in splits}


def _evaluate_split(
    pipeline: Any, examples_dir: str | os.PathLike[str], split: str, config: Any, predict: beam.DoFn, batch: int, folder: Path, locations: dict[str, str]
) -> None:
    """Add one split's branch to the pipeline: read, predict and score, write per-image JSON
    lines and TFMA's metrics, validations and eval_config into `folder`."""
    from tensorflow_model_analysis.evaluators.metrics_plots_and_validations_evaluator import MetricsPlotsAndValidationsEvaluator
    from tensorflow_model_analysis.extractors.slice_key_extractor import SliceKeyExtractor
    from tensorflow_model_analysis.writers.eval_config_writer import EvalConfigWriter
    from tensorflow_model_analysis.writers.metrics_plots_and_validations_writer import MetricsPlotsAndValidationsWriter

    folder.mkdir(parents=True, exist_ok=True)
    extracts = (
        pipeline
        | f"Files{split}" >> beam.Create(split_files(examples_dir, split))
        | f"Read{split}" >> beam.io.ReadAllFromTFRecord(compression_type=beam.io.filesystem.CompressionTypes.GZIP)
        | f"Batch{split}" >> beam.BatchElements(min_batch_size=1, max_batch_size=batch)
        | f"Predict{split}" >> beam.ParDo(predict)
    )
    (
        extracts
        | f"ImageJson{split}" >> beam.Map(lambda extract: json.dumps(_jsonable(extract[IMAGE_KEY]), allow_nan=False))
        | f"WriteImages{split}" >> beam.io.WriteToText(str(folder / PER_IMAGE_FILE), shard_name_template="")
    )
    evaluation = (
        extracts
        | f"SliceKeys{split}" >> SliceKeyExtractor(eval_config=config, materialize=False).ptransform
        | f"Evaluate{split}" >> MetricsPlotsAndValidationsEvaluator(config).ptransform
    )
    paths = {"metrics": str(folder / METRICS_PREFIX), "validations": str(folder / VALIDATIONS_PREFIX)}
    _ = evaluation | f"Write{split}" >> MetricsPlotsAndValidationsWriter(paths, config).ptransform
    location = f"{os.fspath(examples_dir)}/Split-{split}"
    _ = evaluation | f"Config{split}" >> EvalConfigWriter(str(folder), config, data_location=location, data_file_format="tfrecords_gzip", model_locations=locations).ptransform


def _read_slices(folder: Path, split: str, settings: EvalSettings, candidate: str, with_baseline: bool) -> list[dict[str, Any]]:
    """A split's TFMA metrics as JSON records, one per slice, the overall slice first."""
    from tensorflow_model_analysis.slicer import slicer_lib
    from tensorflow_model_analysis.writers.metrics_plots_and_validations_writer import load_and_deserialize_metrics

    records = []
    for record in load_and_deserialize_metrics(str(folder)):
        slice_key = slicer_lib.deserialize_slice_key(record.slice_key)
        key = {name: value.decode() if isinstance(value, bytes) else value for name, value in slice_key}
        entry = {"split": split, "slice": slicer_lib.stringify_slice_key(slice_key), "slice_key": key, "metrics": report_from_proto(record, settings.class_names, candidate)}
        if with_baseline:
            entry["baseline_metrics"] = report_from_proto(record, settings.class_names, BASELINE)
        records.append(entry)
    return sorted(records, key=lambda entry: (len(entry["slice_key"]), entry["slice"]))
