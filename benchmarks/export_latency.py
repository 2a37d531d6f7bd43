"""Export latency ratios on a trained model, nothing trained: each format's median latency per
image over tflite_fp32's, measured side by side (interleaved rounds) at 1 and all cores' threads.

    .venv/bin/python benchmarks/export_latency.py RUN_DIR [--runs 15] [--formats tflite_fp32,tflite_dynamic,...]
    .venv/bin/python benchmarks/export_latency.py --model MODEL_DIR --examples EXAMPLES_DIR [...]
    .venv/bin/python benchmarks/export_latency.py RUN_DIR --existing     # the run's own exports as they are
    .venv/bin/python benchmarks/export_latency.py RUN_DIR --quantizers converter,ai_edge_quantizer --formats tflite_fp32,tflite_dynamic,tflite_int8
    .venv/bin/python benchmarks/export_latency.py --model MODEL_DIR --examples EXAMPLES_DIR --smoke --output result.json

By default the exports are rebuilt with the current exporter (segflow.export.exporters, calibration
and parity gate included) from the run's served model (trainer/model) and evaluated on its
eval split (example_gen/examples), into a temporary folder; `--model` (a folder holding
Format-Serving) and `--examples` (an ExampleGen output) name them directly. `--quantizers`
rebuilds once per export.quantizer and times the TFLite files of all in one interleaved table
(a row per format and quantizer that built it; rows a quantizer does not change appear once,
so machine load shared by the others falls on every row alike). Prints the JSON table (ratios
under "vs_tflite_fp32"; --output writes it there too) and then the markdown table. Nothing in
the run changes. --smoke builds tflite_fp32 and tflite_dynamic only and times 1 run without
warm-up: on a tiny model it checks in seconds that the script runs; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, get_args

import numpy as np

from segflow.export.benchmark import BenchmarkSettings, benchmark, interleave, make_call, markdown, report
from segflow.components.exporter import core as exporter
from segflow.config.experiment import ExperimentConfig, ExportConfig, load_config, validate_config
from segflow.export.serving import SERVING_SUBDIR, ServingSpec

DEFAULT_FORMATS = "saved_model,tflite_fp32,tflite_fp16,tflite_dynamic,tflite_int8,tflite_int16x8,onnx"
SMOKE_FORMATS = "tflite_fp32,tflite_dynamic"  # the reference and one format to compare with it, neither calibrated


def _config(run_dir: Path | None, spec: ServingSpec, formats: list[str], quantizer: str | None) -> ExperimentConfig:
    """The run's config (its export settings, `quantizer` as export.quantizer when given) or,
    for a bare model, one made from its spec."""
    if run_dir is not None:
        config = load_config(run_dir / "config.yaml", [])
    else:
        config = validate_config({"name": "export-latency", "dataset": {"images": ".", "masks": "."}, "classes": list(spec.class_names), "shape": list(spec.shape)})
    settings: dict[str, Any] = {"formats": formats, **({"quantizer": quantizer} if quantizer is not None else {})}
    return config.model_copy(update={"export": config.export.model_copy(update=settings)})


def _compare(builds: dict[str, tuple[Path, dict[str, Any]]], spec: ServingSpec, settings: BenchmarkSettings) -> dict[str, Any]:
    """One interleaved table of the TFLite files each quantizer's rebuild (folder, exports.json
    entries) made: the converter's rows under the format's name, the others' as
    `format (quantizer)`, each distinct build once."""
    rows: dict[str, Any] = {}
    files: dict[str, tuple[str, Path]] = {}
    for out, results in builds.values():
        for name, entry in results.items():
            if not entry.get("file", "").endswith(".tflite"):
                continue
            label = name if entry["quantizer"] == "converter" else f"{name} ({entry['quantizer']})"
            if label not in rows:
                rows[label], files[label] = entry, (name, out / entry["file"])
    pixels = np.random.default_rng(0).uniform(0, spec.value_max, (1, *spec.shape)).astype(np.float32)
    seconds: dict[str, dict[int, list[float]]] = {label: {} for label in rows}
    for threads in settings.threads:
        calls = {label: make_call(name, path, pixels, threads) for label, (name, path) in files.items()}
        for label, values in interleave(calls, settings.runs, settings.warmup).items():
            seconds[label][threads] = values
    return report(rows, seconds, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", type=Path, help="a run folder (trainer/model, example_gen/examples, config.yaml)")
    parser.add_argument("--model", type=Path, help="a model folder holding Format-Serving (instead of RUN_DIR)")
    parser.add_argument("--examples", type=Path, help="ExampleGen output with Split-train and Split-eval (with --model)")
    parser.add_argument("--existing", action="store_true", help="benchmark RUN_DIR's exports as they are, without rebuilding")
    parser.add_argument("--formats", default=DEFAULT_FORMATS, help=f"comma-separated (default {DEFAULT_FORMATS})")
    parser.add_argument("--quantizers", help="comma-separated export.quantizer values to rebuild with and compare (default: the config's)")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", type=Path, help="also write the JSON table here")
    parser.add_argument("--smoke", action="store_true", help=f"formats {SMOKE_FORMATS}, 1 run, no warm-up: checks that the script runs (give it a tiny model)")
    args = parser.parse_args()
    if args.smoke:
        args.formats, args.runs, args.warmup = SMOKE_FORMATS, 1, 0
    if (args.run_dir is None) == (args.model is None) or (args.model is not None) != (args.examples is not None):
        parser.error("give RUN_DIR, or --model and --examples")
    settings = BenchmarkSettings(runs=args.runs, warmup=args.warmup)
    if args.existing:
        table = benchmark(args.run_dir, settings)
    else:
        model_dir = args.model if args.model is not None else args.run_dir / "trainer" / "model"
        examples = args.examples if args.examples is not None else args.run_dir / "example_gen" / "examples"
        spec = ServingSpec.load(model_dir / SERVING_SUBDIR)
        quantizers = args.quantizers.split(",") if args.quantizers else [None]
        unknown = set(quantizers) - {None, *get_args(ExportConfig.model_fields["quantizer"].annotation)}
        if unknown:
            parser.error(f"--quantizers: unknown {', '.join(sorted(map(str, unknown)))}")
        scratch = Path(tempfile.mkdtemp(prefix="segflow-export-latency-"))
        try:
            builds: dict[str, tuple[Path, dict[str, Any]]] = {}
            for quantizer in quantizers:
                out = scratch / (quantizer or "exports")
                builds[out.name] = (out, exporter.run(_config(args.run_dir, spec, args.formats.split(","), quantizer), examples, model_dir, out))
            table = _compare(builds, spec, settings) if len(builds) > 1 else benchmark(out, settings, spec=spec)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    table.update(benchmark="export_latency", smoke=args.smoke, source=os.fspath(args.run_dir or args.model))
    text = json.dumps(table, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    print(markdown(table), end="")


if __name__ == "__main__":
    main()
