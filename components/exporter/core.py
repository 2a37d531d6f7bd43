"""Exporter: every configured format built from the served model, loaded back with its
own runtime and re-evaluated on the eval split, then put through the parity gate: an
export whose mean IoU is more than `export.max_drop` below the float served model's is
marked failed (the Pusher leaves it out). A format this machine cannot build or run (no
TensorRT, no GPU) is recorded as skipped with the reason."""
from __future__ import annotations

import hashlib
import heapq
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from segflow.config import ExperimentConfig
from segflow.evaluation import evaluate, predict_split
from segflow.examples import iter_split
from segflow.exporters import ExportError, ExportFormat, ExportOptions, RepresentativeData, parity_gate
from segflow.io import atomic_dir, read_json, write_json
from segflow.registry import EXPORT_FORMATS
from segflow.runtime import log
from segflow.preprocessing import model_pixels_numpy
from segflow.serving import SERVING_SUBDIR, ServingSpec, serving_mask_predictor

EXPORTS_FILE = "exports.json"


def representative_data(examples_dir: str | os.PathLike[str], shape: tuple[int, int, int], limit: int) -> list[np.ndarray]:
    """Train images prepared exactly as the `fixed_size` signature expects them. The
    calibration set is the `limit` examples with the smallest hash of their file name: the
    same set whatever order the records are in, and a spread sample of the split."""
    chosen = heapq.nsmallest(
        limit, ((hashlib.sha256(example.filename.encode()).hexdigest(), example) for example in iter_split(examples_dir, "train")), key=lambda item: item[0]
    )
    return [model_pixels_numpy(example.image, shape) for _, example in chosen]


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
    samples: list[np.ndarray] | None = None
    results: dict[str, Any] = {}
    served_predictor = serving_mask_predictor(serving)
    reference_mean_iou = evaluate(served_predictor, examples_dir, "eval", spec)["mean_iou"]
    served = predict_split(served_predictor, examples_dir, "eval")
    log(f"exporter: float served model: eval mean IoU {reference_mean_iou:.4f}; exports more than {settings.max_drop} below it fail the parity gate")
    with atomic_dir(exports_dir) as out:
        for name in settings.formats:
            export: ExportFormat = EXPORT_FORMATS.get(name)
            row = {"quantization": export.quantization, "runtime": export.runtime}
            reason = export.unavailable()
            if reason is not None:
                results[name] = {"status": "skipped", "reason": reason, **row}
                log(f"exporter: {name}: skipped: {reason}")
                continue
            started = time.perf_counter()
            options = ExportOptions(onnx_opset=settings.onnx_opset)
            if export.needs_representative_data:
                samples = samples if samples is not None else representative_data(examples_dir, spec.shape, settings.calibration_examples)
                options = ExportOptions(representative=_as_generator(samples), onnx_opset=settings.onnx_opset)
                row["calibration_examples"] = len(samples)
            target = out / export.file_name
            try:
                export.build(serving, target, options)
            except ExportError:
                raise
            except Exception as error:  # a converter's own exception: say which export and file
                raise ExportError(f"exporter: building {name} into {target} failed: {type(error).__name__}: {error}") from error
            report = evaluate(export.load(target, spec), examples_dir, "eval", spec, reference=served)
            results[name] = {
                "path": str(Path(exports_dir) / export.file_name),
                "file": export.file_name,
                "bytes": _size(target),
                **row,
                "mean_iou": report["mean_iou"],
                "per_class_iou": report["per_class_iou"],
                "agreement_with_serving": report["agreement"],
                **parity_gate(report["mean_iou"], reference_mean_iou, settings.max_drop),
                "seconds": round(time.perf_counter() - started, 2),
            }
            verdict = results[name]["reason"] if results[name]["status"] == "failed" else "parity gate passed"
            log(
                f"exporter: {name}: {results[name]['bytes'] / 1e6:.2f} MB, eval mean IoU {report['mean_iou']:.4f}, "
                f"agrees with serving_default on {report['agreement']:.2%} of pixels; {verdict}"
            )
        write_json(out / EXPORTS_FILE, results)
    return results


def read_exports(exports_dir: str | os.PathLike[str]) -> dict[str, Any]:
    return read_json(Path(exports_dir) / EXPORTS_FILE)
