"""Export latency ratios on a trained model, nothing trained: each format's median latency per
image over tflite_fp32's, measured side by side (interleaved rounds) at 1 and all cores' threads.

    .venv/bin/python benchmarks/export_latency.py RUN_DIR [--runs 15] [--formats tflite_fp32,tflite_dynamic,...]
    .venv/bin/python benchmarks/export_latency.py --model MODEL_DIR --examples EXAMPLES_DIR [...]
    .venv/bin/python benchmarks/export_latency.py RUN_DIR --existing     # the run's own exports as they are

By default the exports are rebuilt with the current exporter (segflow.exporters, calibration
and parity gate included) from the run's served model (trainer/model) and evaluated on its
eval split (example_gen/examples), into a temporary folder; `--model` (a folder holding
Format-Serving) and `--examples` (an ExampleGen output) name them directly. Prints the JSON
table (ratios under "vs_tflite_fp32") and then the markdown table. Nothing in the run changes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from segflow.benchmark import BenchmarkSettings, benchmark, markdown
from segflow.components.exporter import core as exporter
from segflow.config import ExperimentConfig, load_config, validate_config
from segflow.serving import SERVING_SUBDIR, ServingSpec

DEFAULT_FORMATS = "saved_model,tflite_fp32,tflite_fp16,tflite_dynamic,tflite_int8,tflite_int16x8,onnx"


def _config(run_dir: Path | None, spec: ServingSpec, formats: list[str]) -> ExperimentConfig:
    """The run's config (its export settings) or, for a bare model, one made from its spec."""
    if run_dir is not None:
        config = load_config(run_dir / "config.yaml", [])
    else:
        config = validate_config({"name": "export-latency", "dataset": {"images": ".", "masks": "."}, "classes": list(spec.class_names), "shape": list(spec.shape)})
    return config.model_copy(update={"export": config.export.model_copy(update={"formats": formats})})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", type=Path, help="a run folder (trainer/model, example_gen/examples, config.yaml)")
    parser.add_argument("--model", type=Path, help="a model folder holding Format-Serving (instead of RUN_DIR)")
    parser.add_argument("--examples", type=Path, help="ExampleGen output with Split-train and Split-eval (with --model)")
    parser.add_argument("--existing", action="store_true", help="benchmark RUN_DIR's exports as they are, without rebuilding")
    parser.add_argument("--formats", default=DEFAULT_FORMATS, help=f"comma-separated (default {DEFAULT_FORMATS})")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if (args.run_dir is None) == (args.model is None) or (args.model is not None) != (args.examples is not None):
        parser.error("give RUN_DIR, or --model and --examples")
    settings = BenchmarkSettings(runs=args.runs, warmup=args.warmup)
    if args.existing:
        table = benchmark(args.run_dir, settings)
    else:
        model_dir = args.model if args.model is not None else args.run_dir / "trainer" / "model"
        examples = args.examples if args.examples is not None else args.run_dir / "example_gen" / "examples"
        spec = ServingSpec.load(model_dir / SERVING_SUBDIR)
        config = _config(args.run_dir, spec, args.formats.split(","))
        scratch = Path(tempfile.mkdtemp(prefix="segflow-export-latency-"))
        try:
            exporter.run(config, examples, model_dir, scratch / "exports")
            table = benchmark(scratch / "exports", settings, spec=spec)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    table["source"] = os.fspath(args.run_dir or args.model)
    print(json.dumps(table, indent=2))
    print(markdown(table), end="")


if __name__ == "__main__":
    main()
