"""The evaluator's Beam pipeline: per-image confusion matrices, boundary counts and
probability histograms, summed per slice by a CombineFn, so the eval split never has to
fit in memory and runs on the same runners as the data components (`beam` config section).

TFMA does the slicing (its SlicingSpec, SliceKeyExtractor and FanoutSlices on the per-image
extracts) and the output formats: MetricsForSlice records (`Split-<name>/metrics-*.tfrecord`,
read back by `tfma.load_metrics`) with TFMA MetricKeys (per-class values under a class_id
sub key). The metrics themselves are sums of per-image confusion matrices: TFMA's metric
computations take one prediction per label, not per-pixel masks of varying size.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import apache_beam as beam
import numpy as np

from segflow.examples import deserialize, scalar_features, split_files
from segflow.io import _jsonable
from segflow.metrics import boundary_counts, boundary_report, matrix_report, probability_histograms, threshold_sweep

BatchPredictor = Callable[[np.ndarray], np.ndarray]  # [B,H,W,C] raw pixels -> [B,H,W,K] probabilities
FEATURES_KEY = "features"  # tfma.FEATURES_KEY: where TFMA's slicer looks for features
STATS_KEY = "stats"
IMAGE_KEY = "image"
METRICS_PREFIX = "metrics"  # TFMA's file name for MetricsForSlice records
PER_IMAGE_FILE = "per_image.jsonl"
SLICE_LINES = "slices"
DERIVED_FEATURES = ("image_size", "object_size", "mask_empty")
SOURCE_FEATURE = "source"
# height and width are in image_size (a bucket); one slice per distinct size would be per image.
NOT_SLICED_BY_DEFAULT = ("height", "width")


@dataclass(frozen=True)
class EvalSettings:
    """What the per-image step and the combiner need (picklable: Beam ships it to workers)."""

    class_names: tuple[str, ...]
    ignore_index: int | None
    boundary_tolerance: float
    threshold_steps: int  # 0: no sweep (more than two labels)
    image_size_buckets: tuple[int, ...]
    object_size_buckets: tuple[float, ...]
    group_by: str | None
    flip_tta: bool

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


def with_flip_tta(predict: BatchPredictor) -> BatchPredictor:
    """Mean of the probabilities of the images and of their horizontal flips (flipped back)."""
    return lambda images: (predict(images) + predict(images[:, :, ::-1])[:, :, ::-1]) / 2.0


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
    from segflow.examples import group_key

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
    from segflow.metrics import ConfusionMatrix

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


def report(stats: dict[str, np.ndarray], settings: EvalSettings) -> dict[str, Any]:
    """Every metric of summed stats (one image, one slice or a whole split)."""
    names = list(settings.class_names)
    result = {"examples": int(stats["examples"]), **matrix_report(stats["matrix"], names), **boundary_report(stats["boundary"], names)}
    if "histograms" in stats:
        result["threshold_sweep"] = threshold_sweep(stats["histograms"])
    return result


class PredictAndScoreFn(beam.DoFn):
    """Runs the model on a batch of serialized examples (same-size images in one call), and
    emits one TFMA extract per image: its slicing features, its stats and its own metrics.
    The model is loaded once per worker (DoFn.setup), not per batch."""

    def __init__(self, loader: Callable[[], BatchPredictor], settings: EvalSettings, split: str) -> None:
        self.loader = loader
        self.settings = settings
        self.split = split
        self.predict: BatchPredictor | None = None

    def setup(self) -> None:
        predict = self.loader()
        self.predict = with_flip_tta(predict) if self.settings.flip_tta else predict

    def process(self, records: list[bytes]) -> Iterator[dict[str, Any]]:
        examples = [(deserialize(record), scalar_features(record)) for record in records]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, (example, _) in enumerate(examples):
            groups.setdefault((example.image.shape, example.image.dtype.str), []).append(index)
        assert self.predict is not None  # set in setup
        for indices in groups.values():
            probabilities = self.predict(np.stack([examples[index][0].image for index in indices]))
            for index, probs in zip(indices, probabilities):
                example, record_features = examples[index]
                features = image_features(example.mask, example.filename, record_features, self.settings)
                stats = image_stats(example.mask, probs, self.settings)
                metrics = report(stats, self.settings)
                metrics.pop("confusion_matrix")
                metrics.pop("threshold_sweep", None)
                yield {
                    FEATURES_KEY: {name: np.array([value if isinstance(value, (int, float)) else str(value).encode()]) for name, value in features.items()},
                    STATS_KEY: stats,
                    IMAGE_KEY: {"split": self.split, "filename": example.filename, "features": features, **metrics},
                }


class SegmentationMetricsFn(beam.CombineFn):
    """Sums per-image stats; the output is `report` of the sums (dataset-level metrics, the
    numbers the literature reports, not means of per-image metrics)."""

    def __init__(self, settings: EvalSettings) -> None:
        self.settings = settings

    def create_accumulator(self) -> dict[str, np.ndarray]:
        labels = self.settings.num_labels
        accumulator = {"examples": np.array(0, np.int64), "matrix": np.zeros((labels, labels), np.int64), "boundary": np.zeros((labels, 4), np.int64)}
        if self.settings.threshold_steps:
            accumulator["histograms"] = np.zeros((2, self.settings.threshold_steps), np.int64)
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

    def extract_output(self, accumulator: dict[str, np.ndarray]) -> dict[str, Any]:
        return report(accumulator, self.settings)


def metric_keys(metrics: dict[str, Any], class_names: tuple[str, ...]) -> dict[Any, Any]:
    """A report as TFMA's metrics dict: scalars by name, per-class values under a class_id
    sub key, the confusion matrix and the sweep's curves as arrays. Keys are unweighted
    (example_weighted None), as the keys of TFMA's thresholds on metrics computed outside it are."""
    from tensorflow_model_analysis.metrics import metric_types

    def key(name: str, class_id: int | None = None) -> Any:
        sub_key = None if class_id is None else metric_types.SubKey(class_id=class_id)
        return metric_types.MetricKey(name=name, sub_key=sub_key, example_weighted=None)

    def number(value: Any) -> Any:
        return float("nan") if value is None else value  # JSON's null: undefined (no such pixels)

    keyed: dict[Any, Any] = {}
    for name, value in metrics.items():
        if isinstance(value, dict) and name.startswith("per_class_"):
            for index, class_name in enumerate(class_names):
                keyed[key(name.removeprefix("per_class_"), index)] = number(value[class_name])
        elif name == "threshold_sweep":
            for part in ("best_threshold", "best_mean_iou"):
                if value[part] is not None:
                    keyed[key(f"threshold_sweep/{part}")] = value[part]
            for part in ("thresholds", "foreground_iou", "mean_iou"):
                keyed[key(f"threshold_sweep/{part}")] = np.array([number(item) for item in value[part]], np.float64)
        elif name == "confusion_matrix":
            keyed[key(name)] = np.asarray(value, np.int64)
        else:
            keyed[key("example_count" if name == "examples" else name)] = number(value)
    return keyed


def slice_entry(split: str, slice_key: tuple[tuple[str, Any], ...], metrics: dict[str, Any]) -> dict[str, Any]:
    """One slice's JSON record: TFMA's stringified slice name, its key and its metrics."""
    from tensorflow_model_analysis.slicer import slicer_lib

    key = {name: value.decode() if isinstance(value, bytes) else value for name, value in slice_key}
    return {"split": split, "slice": slicer_lib.stringify_slice_key(slice_key), "slice_key": key, "metrics": metrics}


def metrics_proto(slice_key: tuple[tuple[str, Any], ...], metrics: dict[str, Any], class_names: tuple[str, ...]) -> bytes:
    """A serialized TFMA MetricsForSlice (what `tfma.load_metrics` reads)."""
    from tensorflow_model_analysis.writers.metrics_plots_and_validations_writer import convert_slice_metrics_to_proto

    return convert_slice_metrics_to_proto((slice_key, metric_keys(metrics, class_names)), None).SerializeToString()


def default_slicing_specs(examples_dir: str | os.PathLike[str], split: str, settings: EvalSettings) -> list[dict[str, Any]]:
    """Overall, source (with group_by), image_size, object_size, mask_empty, and one per scalar
    feature of the split's first example (channels, bit_depth, any metadata column)."""
    import tensorflow as tf

    first = next(iter(tf.data.TFRecordDataset(split_files(examples_dir, split)[:1], compression_type="GZIP")))
    columns = [name for name in sorted(scalar_features(first.numpy())) if name not in NOT_SLICED_BY_DEFAULT]
    derived = ([SOURCE_FEATURE] if settings.group_by is not None else []) + list(DERIVED_FEATURES)
    return [{}] + [{"feature_keys": [name]} for name in derived + [name for name in columns if name not in derived]]


def eval_config(slicing_specs: list[dict[str, Any]], min_mean_iou: float | None = None) -> Any:
    """TFMA's EvalConfig of an evaluation: its slicing specs and the value threshold on mean IoU."""
    from tensorflow_model_analysis.proto import config_pb2

    config = config_pb2.EvalConfig(slicing_specs=[config_pb2.SlicingSpec(**spec) for spec in slicing_specs])
    if min_mean_iou is not None:
        threshold = config_pb2.MetricThreshold(value_threshold=config_pb2.GenericValueThreshold(lower_bound={"value": min_mean_iou}))
        config.metrics_specs.add(thresholds={"mean_iou": threshold})
    return config


def run_pipeline(
    loader: Callable[[], BatchPredictor],
    examples_dir: str | os.PathLike[str],
    splits: dict[str, list[dict[str, Any]]],
    settings: EvalSettings,
    batch: int,
    options: Any,
    out_dir: str | os.PathLike[str],
    scratch: str | os.PathLike[str],
) -> dict[str, list[dict[str, Any]]]:
    """One Beam pipeline over every split in `splits` (split -> slicing specs). Writes
    `Split-<split>/metrics-00000-of-00001.tfrecord` (TFMA MetricsForSlice) and
    `Split-<split>/per_image.jsonl` under `out_dir`; returns each split's slice entries."""
    from tensorflow_model_analysis.extractors import slice_key_extractor
    from tensorflow_model_analysis.slicer import slicer_lib

    out, scratch = Path(out_dir), Path(scratch)
    with beam.Pipeline(options=options) as pipeline:
        for split, specs in splits.items():
            (out / f"Split-{split}").mkdir(parents=True, exist_ok=True)
            extracts = (
                pipeline
                | f"Files{split}" >> beam.Create(split_files(examples_dir, split))
                | f"Read{split}" >> beam.io.ReadAllFromTFRecord(compression_type=beam.io.filesystem.CompressionTypes.GZIP)
                | f"Batch{split}" >> beam.BatchElements(min_batch_size=1, max_batch_size=batch)
                | f"Predict{split}" >> beam.ParDo(PredictAndScoreFn(loader, settings, split))
            )
            (
                extracts
                | f"ImageJson{split}" >> beam.Map(lambda extract: json.dumps(_jsonable(extract[IMAGE_KEY]), allow_nan=False))
                | f"WriteImages{split}" >> beam.io.WriteToText(str(out / f"Split-{split}" / PER_IMAGE_FILE), shard_name_template="")
            )
            sliced = (
                extracts
                | f"SliceKeys{split}" >> slice_key_extractor.SliceKeyExtractor(eval_config=eval_config(specs), materialize=False).ptransform
                | f"Fanout{split}" >> slicer_lib.FanoutSlices()
                | f"Stats{split}" >> beam.MapTuple(lambda slice_key, extract: (slice_key, extract[STATS_KEY]))
                | f"Combine{split}" >> beam.CombinePerKey(SegmentationMetricsFn(settings))
            )
            (
                sliced
                | f"Proto{split}" >> beam.MapTuple(lambda slice_key, metrics: metrics_proto(slice_key, metrics, settings.class_names))
                | f"WriteProto{split}"
                >> beam.io.WriteToTFRecord(str(out / f"Split-{split}" / METRICS_PREFIX), file_name_suffix=".tfrecord", num_shards=1)
            )
            (
                sliced
                | f"SliceJson{split}" >> beam.Map(lambda item, split: json.dumps(_jsonable(slice_entry(split, *item))), split)
                | f"WriteSlices{split}" >> beam.io.WriteToText(str(scratch / f"{SLICE_LINES}-{split}"), shard_name_template="")
            )
    entries = {}
    for split in splits:
        lines = (scratch / f"{SLICE_LINES}-{split}").read_text().splitlines()
        entries[split] = sorted((json.loads(line) for line in lines), key=lambda entry: (len(entry["slice_key"]), entry["slice"]))
    return entries

