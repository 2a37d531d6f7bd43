"""Exporter: every configured format built from the served model, loaded back with its
own runtime and re-evaluated on the eval split, then put through the parity gate: an
export whose mean IoU is more than `export.max_drop` below the float served model's is
marked failed (the Pusher leaves it out). A format this machine cannot build or run (no
TensorRT, no GPU) is recorded as skipped with the reason. The built formats are then timed
side by side (segflow.export.benchmark, a few interleaved rounds at 1 and all cores' threads):
benchmark.json and benchmark.md beside exports.json, and each format's latencies, with a
note when it is slower than tflite_fp32, in its exports.json (so summary.json) entry."""
from __future__ import annotations

import hashlib
import heapq
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from segflow.config.experiment import ExperimentConfig, ExportConfig
from segflow.data.examples import SegmentationExample, iter_split
from segflow.data.preprocessing import model_pixels_numpy
from segflow.evaluate.evaluation import evaluate, predict_split
from segflow.export.benchmark import BenchmarkSettings, markdown, measure, report
from segflow.export.exporters import (
    BENCHMARK_FILE,
    EXPORTS_FILE,
    ExportError,
    ExportFormat,
    ExportOptions,
    RepresentativeData,
    parity_gate,
    quantizer_of,
    quantizer_report_name,
    sidecar,
    sidecar_name,
)
from segflow.export.serving import SERVING_SUBDIR, ServingSpec, serving_mask_predictor
from segflow.utils.io import atomic_dir, read_json, write_json
from segflow.utils.registry import EXPORT_FORMATS
from segflow.utils.runtime import log

QAT_FORMAT = "tflite_int8_qat"  # built from the trainer's quantization-aware model; its row records how it was fine-tuned
BENCHMARK_MARKDOWN = "benchmark.md"
BENCHMARK_SETTINGS = BenchmarkSettings(runs=5, warmup=1)  # quick, every run; `segflow benchmark` takes longer and steadier


def _hash(example: SegmentationExample) -> str:
    return hashlib.sha256(example.filename.encode()).hexdigest()


def _classes(example: SegmentationExample, ignore_index: int | None) -> frozenset[int]:
    return frozenset(int(value) for value in np.unique(example.mask) if value != ignore_index)


def calibration_examples(
    examples_dir: str | os.PathLike[str], limit: int, ignore_index: int | None = None, class_names: tuple[str, ...] = ()
) -> tuple[list[SegmentationExample], dict[str, Any]]:
    """The int8 / int16x8 calibration set, class-stratified: a class that no calibrated image
    shows gets activation ranges that clip it. For each class present in train, rarest first
    (fewest train images), the smallest-hash image containing it unless one chosen already
    does; then the smallest hashes of the file names up to `limit`. One pass over the split,
    keeping at most `limit` images plus one per class; the same set whatever the record order.
    Returns the examples (in hash order) and the record stored with the export."""
    first_with: dict[int, tuple[str, SegmentationExample]] = {}
    classes_of: dict[str, frozenset[int]] = {}
    images_with: Counter[int] = Counter()

    def scan() -> Iterator[tuple[str, SegmentationExample]]:
        for example in iter_split(examples_dir, "train"):
            key, present = _hash(example), _classes(example, ignore_index)
            classes_of[key] = present
            images_with.update(present)
            for value in present:
                if value not in first_with or key < first_with[value][0]:
                    first_with[value] = (key, example)
            yield key, example

    smallest = heapq.nsmallest(limit, scan(), key=lambda item: item[0])
    chosen: dict[str, SegmentationExample] = {}
    covered: set[int] = set()
    for value in sorted(images_with, key=lambda value: (images_with[value], value)):
        if value not in covered and len(chosen) < limit:
            key, example = first_with[value]
            chosen[key] = example
            covered |= classes_of[key]
    for key, example in smallest:
        if len(chosen) >= limit:
            break
        chosen.setdefault(key, example)
    covered = set().union(*(classes_of[key] for key in chosen)) if chosen else set()

    def name(value: int) -> str:
        return class_names[value] if value < len(class_names) else str(value)

    record = {
        "examples": len(chosen),
        "selection": "class-stratified: the smallest-hash train image of each class (rarest first), then the smallest hashes",
        "train_images_per_class": {name(value): images_with[value] for value in sorted(images_with)},
        "classes_missing": [name(value) for value in sorted(set(images_with) - covered)],
    }
    return [chosen[key] for key in sorted(chosen)], record


def representative_data(
    examples_dir: str | os.PathLike[str], shape: tuple[int, int, int], limit: int, ignore_index: int | None = None
) -> list[np.ndarray]:
    """The calibration images prepared exactly as the `fixed_size` signature expects them."""
    examples, _ = calibration_examples(examples_dir, limit, ignore_index)
    return [model_pixels_numpy(example.image, shape) for example in examples]


def _as_generator(samples: list[np.ndarray]) -> RepresentativeData:
    """The TFLite converter wants a callable that yields one input list per sample."""

    def generate() -> Iterator[list[np.ndarray]]:
        for sample in samples:
            yield [sample]

    return generate


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def run(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    exports_dir: str | os.PathLike[str],
) -> dict[str, Any]:
    settings = config.export
    serving = Path(model_dir) / SERVING_SUBDIR
    spec = ServingSpec.load(serving)
    served_predictor = serving_mask_predictor(serving)
    reference_mean_iou = evaluate(served_predictor, examples_dir, "eval", spec, step="exporter: float served model")["mean_iou"]
    parity = _Parity(examples_dir, spec, predict_split(served_predictor, examples_dir, "eval", step="exporter: reference masks"), reference_mean_iou, settings.max_drop)
    calibration = _Calibration(examples_dir, settings.calibration_examples, spec)
    source = {"name": config.name, "model": os.fspath(model_dir), "examples": os.fspath(examples_dir)}
    log(f"exporter: float served model: eval mean IoU {reference_mean_iou:.4f}; exports more than {settings.max_drop} below it fail the parity gate")
    results: dict[str, Any] = {}
    with atomic_dir(exports_dir) as out:
        for name in settings.formats:
            export: ExportFormat = EXPORT_FORMATS.get(name)
            row = _describe(export, config)
            reason = export.unavailable()
            if reason is not None:
                results[name] = {"status": "skipped", "reason": reason, **row}
                log(f"exporter: {name}: skipped: {reason}")
                continue
            results[name] = _build_and_check(export, serving, out, Path(exports_dir), row, settings, calibration, parity, source)
        _store_benchmark(out, results, spec)
        write_json(out / EXPORTS_FILE, results)
    return results


def _describe(export: ExportFormat, config: ExperimentConfig) -> dict[str, Any]:
    """What an export is, before it is built: its quantization, runtime and quantizer."""
    row: dict[str, Any] = {"quantization": export.quantization, "runtime": export.runtime}
    quantizer = quantizer_of(export, config.export.quantizer)
    if quantizer is not None:
        row["quantizer"] = quantizer
    if quantizer == "ai_edge_quantizer":
        row["quantizer_report"] = quantizer_report_name(export.file_name)
    if export.name == QAT_FORMAT and config.qat is not None:
        row["quantization_aware_training"] = config.qat.model_dump()
    return row


@dataclass
class _Calibration:
    """The train images int8 converters calibrate on: drawn once, when the first export needs them."""

    examples_dir: str | os.PathLike[str]
    count: int
    spec: ServingSpec
    samples: list[np.ndarray] | None = None
    record: dict[str, Any] = field(default_factory=dict)

    def draw(self) -> list[np.ndarray]:
        if self.samples is None:
            chosen, self.record = calibration_examples(self.examples_dir, self.count, self.spec.ignore_index, self.spec.class_names)
            self.samples = [model_pixels_numpy(example.image, self.spec.shape) for example in chosen]
            log(f"exporter: calibration: {len(self.samples)} train images, every class present in train included" if not self.record["classes_missing"]
                else f"exporter: calibration: {len(self.samples)} train images miss {self.record['classes_missing']} (export.calibration_examples too small)")
        return self.samples


@dataclass(frozen=True)
class _Parity:
    """What every export is held against: the float served model's masks and eval mean IoU."""

    examples_dir: str | os.PathLike[str]
    spec: ServingSpec
    served: Any
    reference_mean_iou: float
    max_drop: float


def _build_and_check(
    export: ExportFormat, serving: Path, out: Path, exports_dir: Path, row: dict[str, Any], settings: ExportConfig,
    calibration: _Calibration, parity: _Parity, source: dict[str, str],
) -> dict[str, Any]:
    """Build one export into `out`, score it on the eval split against the served model and
    write its sidecar; its row of exports.json, with the parity gate's verdict."""
    started = time.perf_counter()
    options = ExportOptions(onnx_opset=settings.onnx_opset, quantizer=settings.quantizer)
    if export.needs_representative_data:
        samples = calibration.draw()
        options = ExportOptions(representative=_as_generator(samples), onnx_opset=settings.onnx_opset, quantizer=settings.quantizer)
        row = {**row, "calibration_examples": len(samples), "calibration": calibration.record}
    target = out / export.file_name
    try:
        export.build(serving, target, options)
    except ExportError:
        raise
    except Exception as error:  # a converter's own exception: say which export and file
        raise ExportError(f"exporter: building {export.name} into {target} failed: {type(error).__name__}: {error}") from error
    report = evaluate(export.load(target, parity.spec), parity.examples_dir, "eval", parity.spec, reference=parity.served, step=f"exporter: {export.name} parity")
    write_json(out / sidecar_name(export.file_name), sidecar(export, target, parity.spec, source, row.get("calibration"), settings.quantizer))
    result = {
        "path": str(exports_dir / export.file_name),
        "file": export.file_name,
        "sidecar": sidecar_name(export.file_name),
        "bytes": _size(target),
        **row,
        "mean_iou": report["mean_iou"],
        "per_class_iou": report["per_class_iou"],
        "agreement_with_serving": report["agreement"],
        **parity_gate(report["mean_iou"], parity.reference_mean_iou, parity.max_drop),
        "seconds": round(time.perf_counter() - started, 2),
    }
    verdict = result["reason"] if result["status"] == "failed" else "parity gate passed"
    log(
        f"exporter: {export.name}: {result['bytes'] / 1e6:.2f} MB, eval mean IoU {report['mean_iou']:.4f}, "
        f"agrees with serving_default on {report['agreement']:.2%} of pixels; {verdict}"
    )
    return result


def _store_benchmark(out: Path, results: dict[str, Any], spec: ServingSpec) -> None:
    """Time the formats just built (files still in the staging folder `out`) and record the
    table beside them and each format's latencies and slower-than-fp32 note in `results`."""
    built = [name for name, entry in results.items() if "file" in entry]
    if not built:
        return
    table = report(results, measure(out, built, spec, BENCHMARK_SETTINGS), BENCHMARK_SETTINGS)
    write_json(out / BENCHMARK_FILE, table)
    (out / BENCHMARK_MARKDOWN).write_text(markdown(table))
    for name, row in table["formats"].items():
        results[name]["latency"] = row["latency"]
        if "note" in row:
            results[name]["note"] = row["note"]
            log(f"exporter: {name}: {row['note']}")
    log("exporter: latency (segflow benchmark RUN_DIR for more rounds):\n" + markdown(table))


def read_exports(exports_dir: str | os.PathLike[str]) -> dict[str, Any]:
    return read_json(Path(exports_dir) / EXPORTS_FILE)
