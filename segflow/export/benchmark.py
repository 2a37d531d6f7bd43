"""Export latency benchmark: per export format, file size, mean and p90 latency per image at
1..N threads, the speed ratio to tflite_fp32 and the mean IoU the Exporter measured.

Each format runs on its own runtime, one [1,h,w,c] image per call, timing only the call:
LiteRT (its default XNNPACK delegate, `num_threads`) for TFLite, onnxruntime's CPU provider
(`intra_op_num_threads`) for ONNX, the SavedModel's `fixed_size` signature for reference.
TensorFlow sizes its thread pools once per process, so the SavedModel (and a TensorRT
engine, which runs on the GPU) is measured in the largest thread column only.

Runs are interleaved: for each thread count, round after round, every format runs once
per round in turn, so a busy neighbour on a shared machine slows every format alike; the
ratio compares medians over the rounds. A format whose median is more than
`SLOWER_MARGIN` times tflite_fp32's at some thread count gets a note saying so.

Why dynamic-range TFLite was slower than fp32 (ISBI U-Net, 256x256, this 2-core CPU):
the `fixed_size` signature has a free batch, so Keras's Conv2DTranspose computed its output
shape at run time (SHAPE, STRIDED_SLICE, PACK feeding TRANSPOSE_CONV). XNNPACK does not
delegate a TRANSPOSE_CONV whose output shape is not constant, which splits the graph into
5 delegate partitions, and the builtin hybrid (int8-weight, float-activation) TRANSPOSE_CONV
then took 30-38 ms per layer on 1 thread whatever its size (the 16x16x256 -> 32x32x128 layer:
29.9 ms, against 0.74 ms with a constant shape), and did not speed up with 2 threads. The 4
transposed convolutions cost ~137 ms of the 196 ms; hybrid CONV_2D was never the problem
(3x3 conv 64x64x128 -> 64: 1.5 ms hybrid vs 5.2 ms fp32). The TFLite exports are now
converted from the signature traced with batch 1 (segflow.export.exporters), which folds the shape
ops: benchmarks/README.md has the before/after table.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from segflow.export.exporters import EXPORT_FORMATS, EXPORTS_FILE, ExportFormat
from segflow.export.serving import SERVING_SUBDIR, SPEC_FILE, ServingSpec
from segflow.utils.io import read_json

REFERENCE = "tflite_fp32"
SLOWER_MARGIN = 1.10  # tflite_fp16 runs the fp32 graph under XNNPACK, yet measured up to 1.07x fp32 on the loaded 2-core CPU: noise
EXPORTS_SUBDIR = Path("exporter") / "exports"
FIXED_POOL_RUNTIMES = ("TensorFlow / TF Serving", "TensorRT")  # thread count not settable per session

Call = Callable[[], Any]


class BenchmarkError(RuntimeError):
    """Nothing to benchmark at a path, or an export that cannot be loaded; says which."""


@dataclass(frozen=True)
class BenchmarkSettings:
    """Thread counts to measure, interleaved rounds per thread count (the median is over
    them) and untimed warm-up rounds (first calls allocate and pack weights)."""

    threads: tuple[int, ...] = (1, len(os.sched_getaffinity(0)))
    runs: int = 15
    warmup: int = 2

    def __post_init__(self) -> None:
        if not self.threads or min(self.threads) < 1:
            raise BenchmarkError(f"threads must be positive counts, got {self.threads}")
        if self.runs < 1 or self.warmup < 0:
            raise BenchmarkError(f"runs must be >= 1 and warmup >= 0, got runs={self.runs}, warmup={self.warmup}")


def locate_exports(path: str | os.PathLike[str], spec: ServingSpec | None = None) -> tuple[Path, dict[str, Any], ServingSpec]:
    """A run folder (its exporter/exports), an exports folder or a pushed version: the folder,
    its exports.json and the served model's spec (input size and pixel range), found beside
    the exports unless given."""

    root = Path(path)
    exports_dir = root / EXPORTS_SUBDIR if (root / EXPORTS_SUBDIR / EXPORTS_FILE).exists() else root
    if not (exports_dir / EXPORTS_FILE).exists():
        raise BenchmarkError(f"{root}: neither a run folder ({EXPORTS_SUBDIR}/{EXPORTS_FILE}) nor an exports folder ({EXPORTS_FILE}) is here")
    exports = read_json(exports_dir / EXPORTS_FILE)
    if spec is not None:
        return exports_dir, exports, spec
    for folder in (exports_dir / "saved_model", exports_dir.parent.parent / "trainer" / "model" / SERVING_SUBDIR):
        if (folder / SPEC_FILE).exists():
            return exports_dir, exports, ServingSpec.load(folder)
    raise BenchmarkError(f"{exports_dir}: no {SPEC_FILE} in its saved_model export or its run's trainer/model/{SERVING_SUBDIR}")


def present_formats(exports_dir: Path, exports: dict[str, Any]) -> list[str]:
    """Formats the Exporter built whose file is still there, in the capability table's order
    (skipped ones have no file; a parity-gate failure is still measured)."""
    return [
        name for name in EXPORT_FORMATS.names()
        if exports.get(name, {}).get("status") != "skipped" and name in exports and (exports_dir / EXPORT_FORMATS.get(name).file_name).exists()
    ]


def _sample(spec: ServingSpec) -> np.ndarray:
    """One fixed image of raw counts in the model's range: latency does not depend on content."""
    return np.random.default_rng(0).uniform(0, spec.value_max, (1, *spec.shape)).astype(np.float32)


def _litert_call(path: Path, pixels: np.ndarray, threads: int) -> Call:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    from segflow.export.exporters import tflite_input_value

    (source,) = interpreter.get_input_details()
    interpreter.set_tensor(source["index"], tflite_input_value(source, pixels))  # quantized once, outside the timing
    return interpreter.invoke


def _onnx_call(path: Path, pixels: np.ndarray, threads: int) -> Call:
    import onnxruntime

    settings = onnxruntime.SessionOptions()
    settings.intra_op_num_threads = threads
    settings.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), settings, providers=["CPUExecutionProvider"])
    (source,) = session.get_inputs()
    return lambda: session.run(None, {source.name: pixels})


def _saved_model_call(path: Path, pixels: np.ndarray, _: int) -> Call:
    from segflow.export.serving import saved_model_predictor

    predict = saved_model_predictor(path)
    return lambda: predict(pixels)


def _tensorrt_call(path: Path, pixels: np.ndarray, _: int) -> Call:
    from segflow.export.exporters import tensorrt_predictor

    predict = tensorrt_predictor(path)
    return lambda: predict(pixels)


RUNTIME_CALLS: dict[str, Callable[[Path, np.ndarray, int], Call]] = {
    "LiteRT": _litert_call,
    "onnxruntime": _onnx_call,
    "TensorFlow / TF Serving": _saved_model_call,
    "TensorRT": _tensorrt_call,
}


def make_call(name: str, path: Path, pixels: np.ndarray, threads: int) -> Call:
    export: ExportFormat = EXPORT_FORMATS.get(name)
    if export.runtime not in RUNTIME_CALLS:
        raise BenchmarkError(f"{name}: no benchmark runner for its runtime {export.runtime!r}")
    try:
        return RUNTIME_CALLS[export.runtime](path, pixels, threads)
    except Exception as error:  # each runtime raises its own types; say which export
        raise BenchmarkError(f"{name}: {export.runtime} cannot load {path}: {type(error).__name__}: {error}") from error


def interleave(calls: dict[str, Call], runs: int, warmup: int, clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call, `runs` rounds of every call in turn (after `warmup` untimed rounds)."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            started = clock()
            call()
            seconds[name].append(clock() - started)
    return seconds


def measure(exports_dir: Path, names: list[str], spec: ServingSpec, settings: BenchmarkSettings) -> dict[str, dict[int, list[float]]]:
    """Seconds per image for each format at each thread count (fixed-pool runtimes at the
    largest count only); the formats of one thread count are interleaved."""
    pixels = _sample(spec)
    seconds: dict[str, dict[int, list[float]]] = {name: {} for name in names}
    for threads in settings.threads:
        calls = {
            name: make_call(name, exports_dir / EXPORT_FORMATS.get(name).file_name, pixels, threads)
            for name in names
            if EXPORT_FORMATS.get(name).runtime not in FIXED_POOL_RUNTIMES or threads == max(settings.threads)
        }
        for name, values in interleave(calls, settings.runs, settings.warmup).items():
            seconds[name][threads] = values
    return seconds


def _p90(values: list[float]) -> float:
    return float(np.percentile(values, 90))


def report(exports: dict[str, Any], seconds: dict[str, dict[int, list[float]]], settings: BenchmarkSettings) -> dict[str, Any]:
    """The JSON table: per format, bytes, mean IoU, and per thread count the median, mean and
    p90 milliseconds and the median's ratio to tflite_fp32's; a note where it is slower."""
    reference = seconds.get(REFERENCE, {})
    reference_bytes = exports.get(REFERENCE, {}).get("bytes")
    rows: dict[str, Any] = {}
    for name, by_threads in seconds.items():
        entry = exports[name]
        row: dict[str, Any] = {
            "quantization": entry.get("quantization"),
            "runtime": entry.get("runtime"),
            "bytes": entry.get("bytes"),
            "bytes_vs_tflite_fp32": round(entry["bytes"] / reference_bytes, 3) if reference_bytes and "bytes" in entry else None,
            "mean_iou": entry.get("mean_iou"),
            "parity_gate": entry.get("status"),
            "latency": {},
        }
        slower: list[str] = []
        for threads, values in by_threads.items():
            median = statistics.median(values)
            ratio = median / statistics.median(reference[threads]) if threads in reference else None
            row["latency"][str(threads)] = {
                "median_ms": round(median * 1e3, 2),
                "mean_ms": round(statistics.fmean(values) * 1e3, 2),
                "p90_ms": round(_p90(values) * 1e3, 2),
                "vs_tflite_fp32": round(ratio, 3) if ratio is not None else None,
            }
            if ratio is not None and ratio > SLOWER_MARGIN:
                slower.append(f"{ratio:.2f}x at {threads} thread{'s' if threads > 1 else ''}")
        if slower:
            row["note"] = f"slower than {REFERENCE} on this runtime and CPU: {', '.join(slower)} (median latency)"
        rows[name] = row
    return {
        "reference": REFERENCE,
        "threads": list(settings.threads),
        "runs": settings.runs,
        "warmup": settings.warmup,
        "interleaved": True,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "slower_margin": SLOWER_MARGIN,
        "formats": rows,
    }


def markdown(table: dict[str, Any]) -> str:
    """One row per format: bytes, mean IoU, then per thread count mean / p90 ms and x fp32."""
    threads = table["threads"]
    head = ["export", "quantization", "MB", "bytes vs fp32", "mean IoU"]
    for count in threads:
        head += [f"{count} thr mean / p90 ms", f"{count} thr vs fp32"]
    head.append("note")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def number(value: float | None, pattern: str) -> str:
        return "-" if value is None else pattern.format(value)

    for name, row in table["formats"].items():
        megabytes = None if row["bytes"] is None else row["bytes"] / 1e6
        cells = [name, str(row["quantization"]), number(megabytes, "{:.2f}"), number(row["bytes_vs_tflite_fp32"], "{:.2f}x"), number(row["mean_iou"], "{:.4f}")]
        for count in threads:
            cell = row["latency"].get(str(count))
            cells += ["-", "-"] if cell is None else [f"{cell['mean_ms']:.1f} / {cell['p90_ms']:.1f}", number(cell["vs_tflite_fp32"], "{:.2f}x")]
        cells.append(row.get("note", ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"\nmedian of {table['runs']} interleaved runs per format and thread count ({table['warmup']} warm-up), one image per call, "
        f"{table['cpu_cores']} CPU cores; vs fp32 = median latency / {table['reference']}'s; SavedModel and TensorRT in the largest thread column only"
    )
    return "\n".join(lines) + "\n"


def benchmark(
    path: str | os.PathLike[str], settings: BenchmarkSettings, formats: list[str] | None = None, spec: ServingSpec | None = None
) -> dict[str, Any]:
    """`segflow benchmark`: the table for every present export (or the `formats` asked for)."""
    exports_dir, exports, spec = locate_exports(path, spec)
    present = present_formats(exports_dir, exports)
    names = present if formats is None else formats
    absent = [name for name in names if name not in present]
    if absent:
        raise BenchmarkError(f"{exports_dir}: no built export of {', '.join(absent)} (present: {', '.join(present) or 'none'})")
    if not names:
        raise BenchmarkError(f"{exports_dir}: no built export to benchmark (exports.json lists only skipped ones)")
    table = report(exports, measure(exports_dir, names, spec, settings), settings)
    table["exports_dir"] = str(exports_dir)
    return table
