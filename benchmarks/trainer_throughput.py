"""Trainer steps per second fed by the real input pipeline against bare `model.fit` on
in-memory tensors, measured side by side.

    .venv/bin/python benchmarks/trainer_throughput.py CONFIG.yaml [--set key=value ...] [--rounds 7] [--warmup 1] [--output result.json]
    .venv/bin/python benchmarks/trainer_throughput.py CONFIG.yaml --smoke [--workdir DIR] --output result.json

The real side is what the trainer runs: `make_dataset` (GZIP TFRecords, decode, resize,
cache, shuffle, the albumentations policy, batch, TFT normalisation, prefetch) into
`model.fit`. The bare side is one epoch of that same stream, augmented and normalised,
held as tensors in memory and given to `model.fit(x, y)`: the pipeline's cost removed. Both train
the same compiled model (the trainer's loss and metrics), one epoch per round, the two
alternating (order swapped every round), so a busy machine slows both alike. Prints JSON:
median steps per second of each and the ratio pipeline / bare (target >= 0.9); --output writes
it there too. The data components run once into a temporary folder (or --workdir, reused when
present). --smoke is 1 round without warm-up: on a tiny config with its data components already
in --workdir it checks in seconds that the script runs; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras

from segflow.components.example_gen import core as example_gen
from segflow.data.examples import read_counts
from segflow.components.schema_gen import core as schema_gen
from segflow.components.statistics_gen import core as statistics_gen
from segflow.components.transform import core as transform
from segflow.config.experiment import ExperimentConfig, load_config
from segflow.model.losses import LabelSpec, resolve_class_weights
from segflow.data.preprocessing import PixelSpec
from segflow.train.input_pipeline import make_dataset
from segflow.train.network import build_network, compile_network


def prepare(config: ExperimentConfig, root: Path) -> tuple[Path, Path]:
    """(examples, transform graph) of the config's dataset, made once in `root`."""
    examples, transform_dir = root / "examples", root / "transform"
    if not transform_dir.exists():
        example_gen.run(config, examples)
        statistics_gen.run(config, examples, root / "statistics")
        schema_gen.run(config, root / "statistics", root / "schema")
        transform.run(config, examples, root / "schema", transform_dir)
    return examples, transform_dir


def measure(config: ExperimentConfig, examples: Path, transform_dir: Path, rounds: int, warmup: int) -> dict[str, object]:
    keras.utils.set_random_seed(config.seed)
    labels = LabelSpec(config.num_labels, config.sigmoid_head, config.ignore_index, resolve_class_weights(config.class_weights, examples, config.class_names))
    network = build_network(config)
    compile_network(network, config, labels, keras.optimizers.Adam(1e-4), jit_compile=config.trainer.jit_compile)
    train_examples = read_counts(examples)["train_examples"]
    steps = math.ceil(train_examples / config.batch)
    # One stream object for every round, as the trainer keeps one per stage: its RAM cache
    # fills in the warm-up and serves every later epoch.
    stream = make_dataset(config, examples, "train", transform.transform_layer(transform_dir), PixelSpec.load(transform_dir), epochs=(0, 1))
    images, masks = (tf.constant(np.concatenate(part)) for part in zip(*((x.numpy(), y.numpy()) for x, y in stream)))

    def pipeline() -> None:
        network.fit(stream, steps_per_epoch=steps, epochs=1, verbose=0)

    def bare() -> None:
        network.fit(images, masks, batch_size=config.batch, epochs=1, verbose=0)

    sides = {"pipeline": pipeline, "bare": bare}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for round_ in range(warmup + rounds):
        for name in sorted(sides, reverse=bool(round_ % 2)):
            started = time.perf_counter()
            sides[name]()
            if round_ >= warmup:
                seconds[name].append(time.perf_counter() - started)
    rates = {name: statistics.median(steps / value for value in values) for name, values in seconds.items()}
    return {
        "benchmark": "trainer_throughput",
        "config": config.name,
        "architecture": f"{config.architecture}/{config.backbone}",
        "parameters": network.count_params(),
        "shape": config.shape,
        "batch": config.batch,
        "train_examples": train_examples,
        "steps_per_epoch": steps,
        "augmentation": list(config.augmentation),
        "rounds": rounds,
        "cores": len(os.sched_getaffinity(0)),
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "median_steps_per_second": {name: round(value, 3) for name, value in rates.items()},
        "ratio_pipeline_to_bare": round(rates["pipeline"] / rates["bare"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="experiment YAML (its dataset, shape, model, augmentation and batch)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config key (repeatable)")
    parser.add_argument("--rounds", type=int, default=7, help="timed epochs per side (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs per side first: tracing, the RAM cache (default 1)")
    parser.add_argument("--workdir", help="keep the data components' outputs here and reuse them (default: a temporary folder)")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    parser.add_argument("--smoke", action="store_true", help="1 round, no warm-up: checks that the script runs (give it a tiny config)")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.warmup = 1, 0
    config = load_config(args.config, args.set)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="segflow-throughput-"))
    try:
        examples, transform_dir = prepare(config, root)
        text = json.dumps({**measure(config, examples, transform_dir, args.rounds, args.warmup), "smoke": args.smoke}, indent=2)
        print(text)
        if args.output is not None:
            args.output.write_text(text + "\n")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
