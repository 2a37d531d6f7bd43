"""The Beam evaluator against the single-process loop it replaced, on one run's examples and model.

    .venv/bin/python benchmarks/evaluator_beam.py RUN_DIR [--config CONFIG.yaml] [--repeats 2] [--mode multi_threading] [--output result.json]
    .venv/bin/python benchmarks/evaluator_beam.py RUN_DIR --smoke --output result.json

RUN_DIR holds `examples/` (or `example_gen/examples/`) and `model/` (or `trainer/model/`); the
evaluation settings and dataset.group_by come from --config, else RUN_DIR/config.yaml (what
`segflow run` writes), else the defaults. Prints JSON: the eval split's
size, median seconds of the loop (segflow.evaluate.evaluation.evaluate, what the exporter still uses
per export) and of the Beam evaluator (all slices, boundary F1, per-image lines), their
ratio, and whether both give the same confusion matrix; --output writes it there too. Otherwise
writes only to a temporary folder. --smoke is 1 repeat: on a tiny run (the tests' has 5 eval
images) it checks in seconds that the script runs; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from segflow.components.evaluator import core as evaluator
from segflow.config.experiment import ExperimentConfig, load_config, validate_config
from segflow.evaluate.evaluation import evaluate
from segflow.data.examples import iter_split
from segflow.export.serving import SERVING_SUBDIR, ServingSpec, serving_mask_predictor


def _first(run: Path, *candidates: str) -> Path:
    for candidate in candidates:
        if (run / candidate).is_dir():
            return run / candidate
    raise FileNotFoundError(f"{run}: none of {', '.join(candidates)}")


def _config(path: Path | None, mode: str) -> ExperimentConfig:
    base = load_config(path) if path is not None else validate_config({"name": "bench", "dataset": {"images": "", "masks": ""}})
    raw: dict[str, Any] = json.loads(base.to_json())
    raw["beam"] = {**raw["beam"], "running_mode": mode}
    return validate_config(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mode", default="multi_threading", choices=("in_memory", "multi_threading", "multi_processing"))
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    parser.add_argument("--smoke", action="store_true", help="1 repeat: checks that the script runs (give it a tiny run)")
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    examples, model = _first(args.run, "examples", "example_gen/examples"), _first(args.run, "model", "trainer/model")
    config = _config(args.config or (args.run / "config.yaml" if (args.run / "config.yaml").exists() else None), args.mode)
    serving = model / SERVING_SUBDIR
    scratch = Path(tempfile.mkdtemp(prefix="segflow-bench-eval-"))
    seconds: dict[str, list[float]] = {"loop": [], "beam": []}
    try:
        for repeat in range(args.repeats):  # interleaved, so machine noise hits both alike
            started = time.perf_counter()
            loop = evaluate(serving_mask_predictor(serving), examples, "eval", ServingSpec.load(serving))
            seconds["loop"].append(time.perf_counter() - started)
            started = time.perf_counter()
            beam = evaluator.run(config, examples, model, scratch / f"metrics-{repeat}", scratch / f"blessing-{repeat}")
            seconds["beam"].append(time.perf_counter() - started)
        slices = evaluator.read_slices(scratch / "metrics-0")
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        text = json.dumps(
            {
                "benchmark": "evaluator_beam",
                "smoke": args.smoke,
                "run": str(args.run),
                "eval_examples": sum(1 for _ in iter_split(examples, "eval")),
                "running_mode": args.mode,
                "cores": len(os.sched_getaffinity(0)),
                "median_seconds": {name: round(value, 2) for name, value in medians.items()},
                "ratio_beam_to_loop": round(medians["beam"] / medians["loop"], 2),
                "same_confusion_matrix": loop["confusion_matrix"] == beam["confusion_matrix"],
                "mean_iou": {"loop": loop["mean_iou"], "beam": beam["mean_iou"]},
                "frequency_weighted_iou": beam["frequency_weighted_iou"],
                "boundary_f1": beam["boundary_f1"],
                "best_threshold": beam.get("best_threshold"),
                "slices": {split: len(entries) for split, entries in slices.items()},
            },
            indent=2,
        )
        print(text)
        if args.output is not None:
            args.output.write_text(text + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
