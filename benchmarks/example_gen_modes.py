"""ExampleGen wall time under each Beam DirectRunner mode, measured side by side.

    .venv/bin/python benchmarks/example_gen_modes.py [--count 256] [--size 256] [--repeats 3] [--output result.json]
    .venv/bin/python benchmarks/example_gen_modes.py --smoke --output result.json

Prints JSON (and writes it to --output): median seconds per mode and each mode's ratio to
in_memory (lower is faster). Writes a synthetic dataset to a temporary folder; nothing in the
repository changes. --smoke checks in seconds that the script runs (its figures mean nothing):
8 images of 16x16, 1 repeat, without multi_processing, whose workers take ~25 s to start
(tests/components/test_data_components.py runs ExampleGen in that mode).
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

from segflow.components.example_gen import core as example_gen
from segflow.config.experiment import validate_config
from segflow.data.demo_data import CLASS_NAMES, write_demo_dataset

MODES = ("in_memory", "multi_threading", "multi_processing")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    parser.add_argument("--smoke", action="store_true", help="8 images of 16x16, 1 repeat, no multi_processing: checks that the script runs")
    args = parser.parse_args()
    modes = MODES
    if args.smoke:
        args.count, args.size, args.repeats, modes = 8, 16, 1, MODES[:2]
    root = Path(tempfile.mkdtemp(prefix="segflow-bench-"))
    try:
        data = write_demo_dataset(root / "data", count=args.count, size=args.size)
        seconds: dict[str, list[float]] = {mode: [] for mode in modes}
        for repeat in range(args.repeats):
            for mode in modes:  # interleaved, so machine noise hits every mode alike
                config = validate_config(
                    {"name": "bench", "dataset": {"images": str(data / "images"), "masks": str(data / "masks")}, "classes": CLASS_NAMES, "beam": {"running_mode": mode}}
                )
                started = time.perf_counter()
                example_gen.run(config, root / f"out-{mode}-{repeat}")
                seconds[mode].append(time.perf_counter() - started)
        medians = {mode: statistics.median(values) for mode, values in seconds.items()}
        text = json.dumps(
            {
                "benchmark": "example_gen_modes",
                "smoke": args.smoke,
                "images": args.count,
                "size": args.size,
                "cores": len(os.sched_getaffinity(0)),
                "median_seconds": {mode: round(value, 2) for mode, value in medians.items()},
                "ratio_to_in_memory": {mode: round(value / medians["in_memory"], 2) for mode, value in medians.items()},
            },
            indent=2,
        )
        print(text)
        if args.output is not None:
            args.output.write_text(text + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
