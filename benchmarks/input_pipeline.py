"""Training input pipeline throughput on CamVid (configs/camvid.yaml's shape, batch 8), measured side by side.

    .venv/bin/python benchmarks/input_pipeline.py [--steps 40] [--rounds 7] [--workdir /tmp/inbench] [--output result.json]
    .venv/bin/python benchmarks/input_pipeline.py --config CONFIG.yaml --workdir DIR [...]   # another dataset
    .venv/bin/python benchmarks/input_pipeline.py --smoke --config CONFIG.yaml --workdir DIR --output result.json

Variants, each fed the train split of configs/camvid.yaml on CamVid (or of --config), as ExampleGen
wrote it into --workdir, and the same policy (HorizontalFlip p 0.5, Affine and ColorJitter p 1, as YAML entries):
(a) baseline: a keras.utils.Sequence as users of Keras segmentation libraries write it: PIL
    reads the PNGs, albumentations resizes and augments each item; consumed as `model.fit`
    does by default (OrderedEnqueuer, one worker thread, queue of 10);
(b) segflow: the trainer's `make_dataset` training stream (epochs given; cache, seeded
    shuffle, augmentation, batch, TFT normalisation, prefetch), without the model;
(b0) segflow as before: the same stream with the policy forced onto the albumentations
    `numpy_function` path (what (b) runs when an entry has no TensorFlow version);
(c) the decode-only limit: TFRecords, the trainer's decode + resize, batch; no cache, no
    augmentation.
Every round starts a fresh iterator per variant, takes one batch untimed (start-up), then
times `--steps` batches; variants interleave, order rotated each round. Prints a table of
median images/s and the ratios b/a (target >= 2) and b/c (target >= 0.5). The ExampleGen and
Transform outputs are made once in --workdir and reused. --output also writes the figures as
JSON. --smoke runs every variant for 1 round of 1 batch with HorizontalFlip as the whole policy,
to check that the script still runs (its figures mean nothing); on a --config of tiny data it
takes seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

import albumentations as A
import numpy as np
import tensorflow as tf
import tf_keras as keras
from PIL import Image

from segflow.data.augment import build_policy
from segflow.train import input_pipeline as trainer
from segflow.components.transform import core as transform
from segflow.config.experiment import ExperimentConfig, load_config
from segflow.data.preprocessing import PixelSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_throughput import prepare  # noqa: E402  (the data components, once)

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "camvid"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "camvid.yaml"
CAMVID_WORKDIR = Path("/tmp/inbench")
POLICY = (
    "{HorizontalFlip: {p: 0.5}, Affine: {scale: [0.9, 1.1], translate_percent: [-0.05, 0.05], rotate: [-10, 10], p: 1.0},"
    " ColorJitter: {brightness: 0.2, contrast: 0.2, saturation: 0.2, hue: 0.05, p: 1.0}}"
)
# --smoke's policy: still the TF and the albumentations paths, without the ~25 s that XLA takes to
# compile Affine and ColorJitter (tests/data/test_tf_augment.py checks those).
SMOKE_POLICY = "{HorizontalFlip: {p: 0.5}}"
BATCH = 8
Batches = Callable[[], Iterator[object]]


class BaselineSequence(keras.utils.Sequence):
    """The baseline loader: PNGs through PIL, albumentations per item, batches of arrays."""

    def __init__(self, names: list[str], config: ExperimentConfig) -> None:
        self.names = names
        self.images, self.masks = Path(config.dataset.images), Path(config.dataset.masks)  # a mask is named as its image
        height, width = config.shape[:2]
        policy = build_policy(config.augmentation, ignore_index=config.ignore_index)
        self.augment = A.Compose([A.Resize(height, width), *policy.transforms], seed=config.seed)
        self.lock = threading.Lock()  # fit's enqueuer may call from several threads; one policy object

    def __len__(self) -> int:
        return len(self.names) // BATCH

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        images, masks = [], []
        for name in self.names[index * BATCH : (index + 1) * BATCH]:
            image = np.asarray(Image.open(self.images / name).convert("RGB"))
            mask = np.asarray(Image.open(self.masks / name))
            with self.lock:
                out = self.augment(image=image, mask=mask)
            images.append(out["image"].astype(np.float32) / 255.0)
            masks.append(out["mask"])
        return np.stack(images), np.stack(masks)

    def on_epoch_end(self) -> None:
        np.random.default_rng(len(self.names)).shuffle(self.names)


def train_names(examples: Path) -> list[str]:
    """File names of the train split, as ExampleGen wrote them."""
    records = trainer.split_records(examples, "train")
    parse = {"filename": tf.io.FixedLenFeature([], tf.string)}
    return [tf.io.parse_single_example(record, parse)["filename"].numpy().decode() for record in records]


def variants(config: ExperimentConfig, examples: Path, transform_dir: Path, steps: int) -> dict[str, Batches]:
    layer, pixels = transform.transform_layer(transform_dir), PixelSpec.load(transform_dir)
    names = train_names(examples)
    per_epoch = len(names) // BATCH
    epochs = (0, steps // per_epoch + 2)  # a fresh iterator per round never runs out
    segflow = trainer.make_dataset(config, examples, "train", layer, pixels, epochs=epochs)
    with mock.patch.object(trainer, "build_tf_policy", return_value=None):
        segflow_numpy = trainer.make_dataset(config, examples, "train", layer, pixels, epochs=epochs)
    decoded = trainer.split_records(examples, "train").repeat()
    decode_only = decoded.map(lambda record: trainer.decode_example(record, config, pixels)[:2], num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH).prefetch(tf.data.AUTOTUNE)
    sequence = BaselineSequence(names, config)

    def baseline() -> Iterator[object]:
        enqueuer = keras.utils.OrderedEnqueuer(sequence, use_multiprocessing=False, shuffle=False)
        enqueuer.start(workers=1, max_queue_size=10)  # model.fit's defaults
        try:
            yield from enqueuer.get()
        finally:
            enqueuer.stop()

    for stream in (segflow, segflow_numpy):  # one full epoch fills the RAM cache for every later round
        for _ in stream.take(per_epoch + 1):
            pass
    return {
        "(a) baseline Sequence + albumentations": baseline,
        "(b) segflow make_dataset": lambda: iter(segflow),
        "(b0) segflow, albumentations numpy_function": lambda: iter(segflow_numpy),
        "(c) decode-only limit": lambda: iter(decode_only),
    }


def measure(sides: dict[str, Batches], steps: int, rounds: int) -> dict[str, float]:
    """Median images per second of each side over interleaved rounds."""
    rates: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for round_ in range(rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            batches = sides[name]()
            next(batches)  # start-up: threads, first fill of the buffers
            started = time.perf_counter()
            for _ in range(steps):
                next(batches)
            rates[name].append(steps * BATCH / (time.perf_counter() - started))
            getattr(batches, "close", lambda: None)()  # the baseline stops its enqueuer thread
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed batches per variant and round (default 40)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--config", type=Path, help="another dataset's experiment YAML instead of CamVid's (dataset.images and dataset.masks: PNGs, each mask named as its image); needs --workdir")
    parser.add_argument("--workdir", type=Path, help=f"ExampleGen and Transform outputs, made once and reused (default {CAMVID_WORKDIR} for CamVid)")
    parser.add_argument("--output", type=Path, help="also write the figures here as JSON")
    parser.add_argument("--smoke", action="store_true", help="1 round of 1 batch per variant, HorizontalFlip alone: checks that the script runs; its figures mean nothing")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds = 1, 1
    overrides = [f"batch={BATCH}", f"augmentation={SMOKE_POLICY if args.smoke else POLICY}"]
    if args.config is not None:
        if args.workdir is None:  # the CamVid default would be reused for another dataset
            parser.error("--config needs --workdir")
        config = load_config(args.config, overrides)
    elif CAMVID.is_dir():
        config = load_config(CONFIG, [f"dataset.images={CAMVID / 'train'}", f"dataset.masks={CAMVID / 'trainannot'}", *overrides])
    else:
        print(f"skipped: CamVid is absent ({CAMVID}); see ../shared/datasets/README.md")
        return
    examples, transform_dir = prepare(config, args.workdir or CAMVID_WORKDIR)
    rates = measure(variants(config, examples, transform_dir, args.steps), args.steps, args.rounds)
    frames, cores, load = len(train_names(examples)), len(os.sched_getaffinity(0)), os.getloadavg()
    print(f"{config.name} {config.shape[0]}x{config.shape[1]}, {frames} train images, batch {BATCH}, {args.steps} batches x {args.rounds} rounds, "
          f"{cores} cores, load average {' '.join(f'{v:.1f}' for v in load)}")
    print("| variant | images/s (median) |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} |")
    a, b, b0, c = rates.values()
    print(f"b/a = {b / a:.2f} (target >= 2)   b/c = {b / c:.2f} (target >= 0.5)   b/b0 = {b / b0:.2f}   b0/a = {b0 / a:.2f}")
    if args.output is not None:
        result = {
            "benchmark": "input_pipeline",
            "smoke": args.smoke,
            "config": config.name,
            "shape": config.shape,
            "train_examples": frames,
            "batch": BATCH,
            "steps": args.steps,
            "rounds": args.rounds,
            "cores": cores,
            "load_average": [round(value, 2) for value in load],
            "images_per_second": {name: round(rate, 1) for name, rate in rates.items()},
            "ratios": {"b/a": round(b / a, 3), "b/c": round(b / c, 3), "b/b0": round(b / b0, 3), "b0/a": round(b0 / a, 3)},
        }
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
