"""Trainer: tf_keras segmentation model trained from the Examples and the TFT graph.

Input pipeline (tf.data): GZIP TFRecords -> decode (any bit depth, model channels)
-> resize (or full resolution, `patches`) -> cache -> shuffle -> crops (segflow.data.patches)
-> augmentation policy -> batch -> TFT normalisation -> prefetch. Stages run one after another on the same weights, each with its optimizer,
schedule, loss and callbacks (the top-level ones unless it has its own). Writes the served model (`Format-Serving/`, TFT graph inside) and a model-run
folder with TensorBoard logs, `history.csv` and checkpoints.

Distribution (`trainer` config section, segflow/train/distribute.py): the model is built and
compiled inside the strategy's scope, the global batch is `batch` x replicas, and the
learning rate optionally scales with the replicas. With `trainer.workers` > 1 this core is
a launcher (segflow/cluster/launcher.py): every worker runs `train_worker` under
MultiWorkerMirroredStrategy; only the chief (worker 0) writes the checkpoints, TensorBoard
logs, history and model, the others write to their scratch folders, which are removed.
`model_run/workers.json` records each worker's final-weights digest (they must agree).

Robustness: a ResourceExhaustedError (out of memory) during a stage halves the batch and
retries the stage from its backup, down to batch 1; a NaN or infinite loss stops training
with `TrainingDiverged`, and the last good weights stay in `backup/`. `model_run/training.json`
records the batch used, the halvings and the epoch a resumed run started from (summary.json
reports it). `trainer.mixed_precision` and `trainer.jit_compile` are the speed switches;
the served model is always a float32 copy.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf
import tf_keras as keras
import yaml

from segflow.cluster.launcher import backend_name, launch

from segflow.cluster.workers import LaunchRequest, worker_scratch
from segflow.config.experiment import ExperimentConfig, StageConfig
from segflow.data.augment import apply_policy, build_policy, example_seed
from segflow.data.examples import split_files
from segflow.data.hard_negatives import ErrorMaps, RefreshErrorMaps
from segflow.data.patches import crop_plan, grid_tiles, model_mask, sample_crop
from segflow.data.preprocessing import PixelSpec, model_pixels, scale_pixels
from segflow.data.tf_augment import build_tf_policy, example_seed_tensor
from segflow.evaluate.analyze import HISTORY_FILE
from segflow.export.serving import QAT_SERVING_SUBDIR, SegmentationServer, ServingSpec
from segflow.model.losses import LabelSpec, build_loss, resolve_class_weights
from segflow.model.metrics import SegmentationMetrics
from segflow.model.models import ModelSpec, apply_stage_freeze, build_model, model_spec
from segflow.train.callbacks import (
    CHECKPOINTS_FOLDER,
    PREDICTIONS_FOLDER,
    KeepBest,
    early_stopping,
    live_predictions,
    write_config_text,
)
from segflow.train.distribute import (
    Plan,
    evaluation_batch,
    make_plan,
    scaled_learning_rate,
    shard_by_data,
)
from segflow.train.optimizers import (
    Lookahead,
    WeightAveraging,
    build_optimizer,
    recompute_batchnorm,
)
from segflow.train.schedules import LearningRateLogger, ReduceOnPlateau, build_schedule
from segflow.utils.io import atomic_dir, write_json
from segflow.utils.runtime import log
from segflow.utils.storage import is_uri, localized

KERAS_FILE = "keras/model.keras"
TRAINING_FILE = "training.json"  # in model_run/: batch used, halvings, resumed epoch
LAST_GOOD_FILE = "last-good.weights.h5"  # in backup/ after a diverged stage: the weights before it
BACKUP_FOLDER = "backup"  # beside the trainer's outputs, not inside their temporary folders
AUGMENTATION_FOLDER = "augmentation"  # in model_run/: preview.png and preview.policy.json (segflow.train.preview)
PREVIEW_EXAMPLES = 8
TENSORBOARD_FOLDER = "logs"  # in model_run/: Keras' scalars, prediction panels, the resolved config
FOLD_EXAMPLES = "fold_examples"  # a k-fold trainer's view of the Examples, beside its outputs while it trains
CACHE_BUDGET_BYTES = 2 * 1024**3  # decoded, resized examples kept in RAM up to this size
SHUFFLE_BUFFER = 1024
CROP_SHUFFLE_BUFFER = 256  # crops of one image, mixed with the next images' (patches.crops_per_image)
WORKERS_FILE = "workers.json"  # in model_run/ after a multi-worker run: each worker's result
WORKER_ENTRY = "segflow.components.trainer.core:train_worker"
# Fault injection for tests: "<worker index>:<epoch>" makes that worker (0 alone) SIGKILL itself after that epoch.
KILL_WORKER_ENV = "SEGFLOW_FAULT_KILL_WORKER"
# `segflow run --resume` points the new run's trainer at the interrupted run's backup/ folder.
RESUME_BACKUP_ENV = "SEGFLOW_RESUME_BACKUP"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: continuing would only spread it through the weights."""


class BatchTooLarge(RuntimeError):
    """Out of memory even at batch 1."""


def cache_bytes(examples: int, shape: list[int]) -> int:
    """RAM that caching a split needs: float32 image plus uint8 mask per example."""
    height, width, channels = shape
    return examples * height * width * (4 * channels + 1)


def train_inputs(config: ExperimentConfig, examples_dir: str | os.PathLike[str]) -> int:
    """Model inputs in a training epoch: one per train example, or its crops (`patches`)."""
    from segflow.data.examples import read_counts

    return read_counts(examples_dir)["train_examples"] * config.patches.crops_per_image


def _decoded_shape(config: ExperimentConfig, examples_dir: str | os.PathLike[str], split: str) -> list[int]:
    """The size of a decoded example: the model's, or at full resolution (`patches.resize`
    none) the split's first image's, which stands for the others (the cache estimate)."""
    if config.patches.resize != "none":
        return config.shape
    from segflow.data.examples import iter_split

    first = next(iter(iter_split(examples_dir, split)), None)
    return config.shape if first is None else [*first.image.shape[:2], config.shape[2]]


def _records(examples_dir: str | os.PathLike[str], split: str) -> tf.data.TFRecordDataset:
    """The split's serialized examples (ExampleGen's GZIP shards)."""
    return tf.data.TFRecordDataset(split_files(examples_dir, split), compression_type="GZIP")


def _decode(record: tf.Tensor, config: ExperimentConfig, pixels: PixelSpec) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(image scaled to [0, 1], mask, file name), at the model size, or at full resolution
    with `patches.resize` none (segflow.data.patches cuts them)."""
    height, width, channels = config.shape
    features = tf.io.parse_single_example(
        record,
        {
            "image": tf.io.FixedLenFeature([], tf.string),
            "mask": tf.io.FixedLenFeature([], tf.string),
            "bit_depth": tf.io.FixedLenFeature([], tf.int64),
            "filename": tf.io.FixedLenFeature([], tf.string),
        },
    )
    # decode_png as uint16 stretches 8-bit files by 257; undo that to keep raw counts.
    wide = tf.io.decode_png(features["image"], channels=0, dtype=tf.uint16)
    raw = tf.where(features["bit_depth"] == 8, wide // 257, wide)
    image = scale_pixels(model_pixels(raw[None], config.shape, config.patches.resize, config.patches.interpolation)[0], pixels.value_max)
    mask = model_mask(tf.io.decode_png(features["mask"], channels=1), config.shape, config.patches.resize, config.ignore_index)
    size = [None, None] if config.patches.resize == "none" else [height, width]
    return tf.ensure_shape(image, [*size, channels]), tf.ensure_shape(tf.cast(mask, tf.uint8), size), features["filename"]


def _augmenter(config: ExperimentConfig) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]] | None:
    """A tf.data map function applying the augmentation policy with a per-example,
    per-epoch seed: as TF ops when every entry has a TF version (segflow/data/tf_augment.py: no
    GIL, parallel), else albumentations in a numpy_function, where each thread has its own
    policy object so seeding it is race-free."""
    if not config.augmentation:
        return None
    height, width, channels = config.shape
    graph_policy = build_tf_policy(build_policy(config.augmentation, ignore_index=config.ignore_index), (height, width, channels))
    if graph_policy is not None:

        def augment_graph(image: tf.Tensor, mask: tf.Tensor, filename: tf.Tensor, epoch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return graph_policy(image, mask, example_seed_tensor(config.seed, epoch, filename))

        return augment_graph
    local = threading.local()

    def augment(image: np.ndarray, mask: np.ndarray, filename: bytes, epoch: np.int64) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(local, "policy"):
            local.policy = build_policy(config.augmentation, ignore_index=config.ignore_index)
        return apply_policy(local.policy, image, mask, example_seed(config.seed, int(epoch), filename.decode()))

    def augment_tf(image: tf.Tensor, mask: tf.Tensor, filename: tf.Tensor, epoch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image, mask = tf.numpy_function(augment, [image, mask, filename, epoch], [tf.float32, tf.uint8], stateful=False)
        return tf.ensure_shape(image, [height, width, channels]), tf.ensure_shape(mask, [height, width])

    return augment_tf


def make_dataset(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    split: str,
    transform_layer: Any,
    pixels: PixelSpec,
    epochs: tuple[int, int] | None = None,
    batch: int | None = None,
    drop_remainder: bool = False,
    negatives: str | int | None = None,
    error_maps: ErrorMaps | None = None,
) -> tf.data.Dataset:
    """Batches of (normalised image, mask). With `epochs` (first, end) it is the training
    stream for those epochs: shuffled and augmented per epoch from seeds, so that the
    same data and config give the same batches whatever the thread scheduling. `batch` is
    the global batch (default: config `batch`); under several workers the stream is sharded
    by element (policy DATA), so each worker keeps its replicas' part of every batch;
    `drop_remainder` drops a short last batch (per epoch), which would leave a replica empty;
    `negatives` is the stage's crop balance (segflow.data.patches.crop_plan); `error_maps` are
    the hard negatives' (segflow.data.hard_negatives), read as the crops are drawn."""
    from segflow.data.examples import read_counts
    from segflow.data.preprocessing import RAW_FEATURE, TRANSFORMED_FEATURE

    records = _records(examples_dir, split)
    decoded = records.map(lambda record: _decode(record, config, pixels), num_parallel_calls=tf.data.AUTOTUNE)
    batch = batch or config.batch
    needed = cache_bytes(read_counts(examples_dir)[f"{split}_examples"], _decoded_shape(config, examples_dir, split))
    if needed <= CACHE_BUDGET_BYTES:
        decoded = decoded.cache()
    else:  # decoding every epoch is slower than RAM, but never runs the machine out of memory
        log(f"trainer: {split} split needs {needed / 1024**3:.1f} GiB decoded; not caching it in RAM")
    patches, tile = config.patches, (config.shape[0], config.shape[1])
    if epochs is None:
        pairs = decoded.map(lambda image, mask, _: (image, mask))
        if patches.resize == "none":  # every pixel, in tiles of the model size
            pairs = pairs.flat_map(lambda image, mask: tf.data.Dataset.from_tensor_slices(grid_tiles(image, mask, tile, config.ignore_index)))
        batches = pairs.batch(batch, drop_remainder=drop_remainder)
    else:
        augment = _augmenter(config)
        hard_share = patches.hard_negatives.share if error_maps is not None and patches.hard_negatives else 0.0
        cropping = crop_plan(patches.positive_share, negatives, hard_share)

        def crops(image: tf.Tensor, mask: tf.Tensor, name: tf.Tensor, epoch: int) -> tf.data.Dataset:
            """`crops_per_image` crops of one example, each from its own stateless seed."""
            seed = tf.random.experimental.stateless_fold_in(example_seed_tensor(config.seed, tf.constant(epoch, tf.int64), name), 1)
            errors = error_maps.candidates(name, epoch) if hard_share else None
            draws = [sample_crop(image, mask, tf.random.experimental.stateless_fold_in(seed, draw), tile, cropping, config.ignore_index, errors)
                     for draw in range(patches.crops_per_image)]
            names = tf.strings.join([name, tf.strings.as_string(tf.range(patches.crops_per_image))], separator="#")
            return tf.data.Dataset.from_tensor_slices((tf.stack([draw[0] for draw in draws]), tf.stack([draw[1] for draw in draws]), names))

        def one_epoch(epoch: int) -> tf.data.Dataset:
            # One dataset per epoch with a Python seed: order and augmentation draws are
            # functions of (seed, epoch, file name), not of thread scheduling.
            shuffled = decoded.shuffle(SHUFFLE_BUFFER, seed=config.seed * 100_003 + epoch, reshuffle_each_iteration=False)
            if patches.resize == "none":  # crops of one image are mixed with the others' before batching
                shuffled = shuffled.flat_map(lambda image, mask, name: crops(image, mask, name, epoch))
                if patches.crops_per_image > 1:
                    shuffled = shuffled.shuffle(CROP_SHUFFLE_BUFFER, seed=config.seed * 100_003 + epoch, reshuffle_each_iteration=False)
            if augment is None:
                examples = shuffled.map(lambda image, mask, _: (image, mask))
            else:
                examples = shuffled.map(lambda image, mask, name: augment(image, mask, name, tf.constant(epoch, tf.int64)), num_parallel_calls=tf.data.AUTOTUNE)
            return examples.batch(batch, drop_remainder=drop_remainder)

        batches = functools.reduce(tf.data.Dataset.concatenate, (one_epoch(epoch) for epoch in range(*epochs)))
    normalized = batches.map(
        lambda image, mask: (transform_layer({RAW_FEATURE: image})[TRANSFORMED_FEATURE], mask), num_parallel_calls=tf.data.AUTOTUNE
    )
    if error_maps is not None:  # its crops may wait for a refresh: on threads of its own, never the refresh's
        options = tf.data.Options()
        options.threading.private_threadpool_size = max(4, os.cpu_count() or 1)
        normalized = normalized.with_options(options)
    return shard_by_data(normalized.prefetch(tf.data.AUTOTUNE))


def _error_maps(config: ExperimentConfig, examples_dir: str | os.PathLike[str]) -> ErrorMaps | None:
    """The hard negatives' error maps of the train split (`patches.hard_negatives`), or None."""
    settings = config.patches.hard_negatives
    if settings is None:
        return None
    records = _records(examples_dir, "train")
    names = records.map(lambda record: tf.io.parse_single_example(record, {"filename": tf.io.FixedLenFeature([], tf.string)})["filename"])
    return ErrorMaps([name.decode() for name in names.as_numpy_iterator()], settings.refresh_every, settings.keep, config.seed)


def _refresh_error_maps(
    config: ExperimentConfig, examples_dir: str | os.PathLike[str], maps: ErrorMaps, network: keras.Model, transform_layer: Any, pixels: PixelSpec, end_epoch: int
) -> RefreshErrorMaps:
    """The callback that predicts the full-resolution train images (TFT graph, then the network) for `maps`."""
    from segflow.data.preprocessing import RAW_FEATURE, TRANSFORMED_FEATURE
    from segflow.model.losses import probabilities

    records = _records(examples_dir, "train")
    examples = records.map(lambda record: _decode(record, config, pixels))

    def predict(tiles: tf.Tensor) -> tf.Tensor:
        return probabilities(network(transform_layer({RAW_FEATURE: tiles})[TRANSFORMED_FEATURE], training=False), config.sigmoid_head)

    tile = (config.shape[0], config.shape[1])
    return RefreshErrorMaps(maps, end_epoch, examples, predict, tile, config.ignore_index, lambda text: log(f"trainer: {text}"))


def network_spec(config: ExperimentConfig) -> ModelSpec:
    return model_spec(config.shape, 1 if config.sigmoid_head else config.num_labels, config.backbone, config.model)


def build_network(config: ExperimentConfig) -> keras.Model:
    return build_model(config.architecture, network_spec(config))


def run(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    transform_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    model_run_dir: str | os.PathLike[str],
    fold: int | None = None,
) -> dict[str, Any]:
    """Train every stage, then write the served model. `fold` (k-fold runs): train on the
    other folds, validate on this one (a fold view of the Examples, beside
    `model_run_dir` so that every worker can read it; removed at the end). The inputs may be gs:// or s3:// URIs
    (copied to local disk first: tf.data cannot read s3 and the TFT graph wants a folder).
    A crash resumes from `backup/` beside `model_run_dir`: finished stages are skipped, the
    running one continues at its last epoch. With `trainer.workers` > 1 the training runs
    in launched workers (`_launch`) and this process waits for them."""
    if fold is not None:
        from segflow.components.example_gen.core import fold_view
        from segflow.data.examples import read_counts

        with fold_view(examples_dir, fold, Path(model_run_dir).parent / FOLD_EXAMPLES) as view:
            counts = read_counts(view)
            choices = config.validation_choices
            use = f"choosing with {', '.join(choices)} on its {counts['eval_examples']}: its scores saw that choice" if choices else f"validating on its {counts['eval_examples']}"
            log(f"trainer: fold {fold}: training on {counts['train_examples']} examples of the other folds, {use}")
            return run(config, view, transform_dir, model_dir, model_run_dir)
    _adopt_backup(Path(model_run_dir).parent / BACKUP_FOLDER)
    if config.trainer.workers > 1:
        return _launch(config, examples_dir, transform_dir, model_dir, model_run_dir)
    plan = make_plan(config.trainer.distribution)  # before any TensorFlow op (collectives are configured at startup)
    with localized(examples_dir) as local_examples, localized(transform_dir) as local_transform:
        final, _ = _train(config, plan, local_examples, local_transform, model_dir, model_run_dir, Path(model_run_dir).parent / BACKUP_FOLDER)
    return final


def _adopt_backup(backup: Path) -> None:
    """`segflow run --resume` reruns the DAG in new task folders: move the interrupted run's
    backup (RESUME_BACKUP_ENV) to where this trainer looks, unless it already has one."""
    previous = os.environ.get(RESUME_BACKUP_ENV)
    if not previous or backup.exists() or not Path(previous).is_dir():
        return
    backup.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(previous, backup)
    log(f"trainer: resuming from the interrupted run's backup {previous}")


def _launch(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    transform_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    model_run_dir: str | os.PathLike[str],
) -> dict[str, Any]:
    """Run `train_worker` in `trainer.workers` workers (segflow.cluster.launcher) and check they agree.
    Locally the chief writes the outputs in place; on Kubernetes (`_cluster_launch`) through
    the shared volume. Adds `workers.json` (each worker's final-weights digest) to model_run/."""
    if config.trainer.distribution not in ("auto", "multi_worker"):
        raise ValueError(
            f"trainer.workers {config.trainer.workers} trains with MultiWorkerMirroredStrategy: "
            f"trainer.distribution must be auto or multi_worker, not {config.trainer.distribution}"
        )
    backend = backend_name(config.trainer.launcher)
    if backend == "local":
        request = _launch_request(config, examples_dir, transform_dir, model_dir, model_run_dir, Path(model_run_dir).parent)
        try:
            results = launch(request, backend)
        except BaseException:
            _remove_partial_outputs(Path(model_dir), Path(model_run_dir))
            raise
    else:
        results = _cluster_launch(config, backend, examples_dir, transform_dir, model_dir, model_run_dir)
    digests = {result.get("weights_sha256") for result in results}
    if len(digests) != 1 or None in digests:
        raise RuntimeError(f"trainer: the workers' final weights differ (sha256 per worker: {[r.get('weights_sha256') for r in results]})")
    chiefs = [result for result in results if result.get("chief")]
    if len(chiefs) != 1:
        raise RuntimeError(f"trainer: expected one chief among the workers, got {len(chiefs)}")
    write_json(Path(model_run_dir) / WORKERS_FILE, {"workers": [{key: value for key, value in r.items() if key != "final"} for r in results]})
    log(f"trainer: {len(results)} workers agree on the final weights (sha256 {digests.pop()[:12]}...)")
    return chiefs[0]["final"]


def _launch_request(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    transform_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    model_run_dir: str | os.PathLike[str],
    workdir: Path,
    run_id: str = "",
) -> LaunchRequest:
    arguments = {
        "config_json": config.to_json(),
        "examples_dir": str(examples_dir),
        "transform_dir": str(transform_dir),
        "model_dir": str(model_dir),
        "model_run_dir": str(model_run_dir),
    }
    return LaunchRequest(
        name="trainer",
        entry=WORKER_ENTRY,
        arguments=arguments,
        workers=config.trainer.workers,
        timeout_seconds=config.trainer.timeout_seconds,
        workdir=workdir,
        config_json=arguments["config_json"],
        run_id=run_id,
    )


def _cluster_launch(
    config: ExperimentConfig,
    backend: str,
    examples_dir: str | os.PathLike[str],
    transform_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    model_run_dir: str | os.PathLike[str],
) -> list[dict[str, Any]]:
    """Worker pods cannot see this step's local folders, so the run goes through a staging
    folder on the PVC (`kubernetes.pvc`, mounted in this step and in every worker): local
    inputs are copied there (URIs are read by the workers themselves), the chief writes the
    model and model_run there, and they are copied into this step's outputs afterwards. The
    folder is named after the config and the output path, so a retried step resumes from the
    `backup/` a failed attempt left in it; a successful launch removes it."""
    if not config.kubernetes.pvc:
        raise ValueError(
            f"trainer.workers {config.trainer.workers} with the {backend} launcher needs kubernetes.pvc: the worker pods "
            "read the examples from that shared volume and the chief writes the model to it"
        )
    mount = Path(config.kubernetes.pvc_mount_path)
    run_id = hashlib.sha256(f"{config.to_json()}|{Path(model_dir).resolve()}".encode()).hexdigest()[:10]
    staging = mount / ".segflow-launch" / run_id
    shutil.rmtree(staging / "launch", ignore_errors=True)  # a failed attempt's results

    def shared(location: str | os.PathLike[str], name: str) -> str:
        if is_uri(str(location)) or Path(location).resolve().is_relative_to(mount.resolve()):
            return str(location)
        target = staging / "inputs" / name
        if not target.exists():
            with atomic_dir(target) as copy:
                shutil.copytree(location, copy, dirs_exist_ok=True)
        return str(target)

    staged_model, staged_run = staging / "model", staging / "model_run"
    request = _launch_request(
        config, shared(examples_dir, "examples"), shared(transform_dir, "transform"), staged_model, staged_run, staging / "launch", run_id
    )
    results = launch(request, backend)
    for staged, target in ((staged_model, model_dir), (staged_run, model_run_dir)):
        with atomic_dir(target) as copy:
            shutil.copytree(staged, copy, dirs_exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    for result in results:  # where the chief wrote, as this step's caller sees it
        if result.get("chief"):
            result["wrote"] = str(model_run_dir)
    return results


def _remove_partial_outputs(*targets: Path) -> None:
    """What a killed chief leaves: atomic_dir's temporary siblings (`.<name>.*`) of its outputs
    and a half-written stage weights file; `backup/` itself stays, to resume from."""
    for target in targets:
        for partial in target.parent.glob(f".{target.name}.*"):
            shutil.rmtree(partial, ignore_errors=True)
    backup = targets[0].parent / BACKUP_FOLDER
    for partial in backup.glob(".partial-*"):
        partial.unlink(missing_ok=True)


def train_worker(config_json: str, examples_dir: str, transform_dir: str, model_dir: str, model_run_dir: str) -> dict[str, Any]:
    """One worker of a multi-worker run (called by `python -m segflow.cluster.workers worker`, with
    TF_CONFIG set). The chief writes to `model_dir`, `model_run_dir` and the shared `backup/`
    beside them; another worker writes to its scratch folder and removes what it wrote."""
    config = ExperimentConfig.from_json(config_json)
    plan = make_plan(config.trainer.distribution)  # first: MultiWorkerMirroredStrategy needs a fresh context
    backup = Path(model_run_dir).parent / BACKUP_FOLDER
    private: Path | None = None
    if not plan.chief:
        private = Path(tempfile.mkdtemp(prefix=f"worker-{plan.index}-", dir=worker_scratch()))
        model_dir, model_run_dir = str(private / "model"), str(private / "model_run")
    try:
        with localized(examples_dir) as local_examples, localized(transform_dir) as local_transform:
            final, digest = _train(config, plan, local_examples, local_transform, model_dir, model_run_dir, backup)
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
    return {
        "index": plan.index,
        "chief": plan.chief,
        "wrote": str(model_run_dir),
        "removed": private is not None,
        "weights_sha256": digest,
        "final": final,
    }


class _KillAfterEpoch(keras.callbacks.Callback):
    """Fault injection (KILL_WORKER_ENV): this worker kills itself as a crashed node would."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if epoch + 1 >= self.epoch:
            log(f"trainer: {KILL_WORKER_ENV}: killing this worker after epoch {epoch + 1}")
            time.sleep(1.0)  # the line reaches the console through this process's own relay thread (segflow.utils.runtime), which the kill stops
            os.kill(os.getpid(), signal.SIGKILL)


def _fault_callbacks(plan: Plan) -> list[keras.callbacks.Callback]:
    value = os.environ.get(KILL_WORKER_ENV)
    if not value:
        return []
    index, _, epoch = value.partition(":")
    return [_KillAfterEpoch(int(epoch or 1))] if int(index) == plan.index else []


class _StopOnNaN(keras.callbacks.Callback):
    """Raises TrainingDiverged on a NaN or infinite loss (tf_keras' TerminateOnNaN only ends
    fit quietly). Listed before BackupAndRestore, so a diverged epoch is never backed up; the
    weights the epoch started from are saved as `last_good` for a restart at a lower rate."""

    def __init__(self, stage: int, last_good: Path) -> None:
        super().__init__()
        self.stage, self.last_good = stage, last_good
        self.good: list[np.ndarray] = []
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch, self.good = epoch, self.model.get_weights()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self._check(logs, f"batch {batch + 1}")

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._check(logs, "end")

    def _check(self, logs: Any, where: str) -> None:
        bad = {key: value for key, value in (logs or {}).items() if key.endswith("loss") and not math.isfinite(float(value))}
        if not bad:
            return
        self.model.set_weights(self.good)
        _save_weights_atomically(self.model, self.last_good)
        raise TrainingDiverged(
            f"trainer: stage {self.stage}, epoch {self.epoch + 1} ({where}): {', '.join(f'{k} {v}' for k, v in bad.items())}; training stopped. "
            f"The weights at the start of epoch {self.epoch + 1} are in {self.last_good} (the stage's own checkpoint of that epoch in {self.last_good.parent / f'stage-{self.stage}'}); "
            "lower the learning rate, or restart from them with stages[].initial_weights"
        )


class _StepLogger(keras.callbacks.Callback):
    """Adds the optimizer's step count to each epoch's logs (history.csv `optimizer_steps`),
    which shows that a resumed stage continues its count and its schedule where it stopped."""

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if logs is not None:
            logs["optimizer_steps"] = int(self.model.optimizer.iterations.numpy())


class _EpochLine(keras.callbacks.Callback):
    """segflow's console line per epoch (Keras' own verbose=2 lines go to the log file only);
    after the loggers, so the values are the ones history.csv gets."""

    SHOWN = ("loss", "mean_iou", "val_loss", "val_mean_iou", "lr")

    def __init__(self, label: str, epochs: int, first: int = 0) -> None:
        super().__init__()
        self.label, self.epochs, self.first = label, epochs, first  # `first`: Keras' index of this fit's epoch 1
        self.started = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        values = ", ".join(f"{name} {float(logs[name]):.4g}" for name in self.SHOWN if logs and name in logs)
        log(f"{self.label}: epoch {epoch + 1 - self.first}/{self.epochs}: {values} ({time.perf_counter() - self.started:.1f} s)")


class _ResetSteps(keras.callbacks.Callback):
    """After a batch halving: the restored step count was in the old batch's steps; the
    stage's schedule counts in the new ones, so set it to the restored epochs' new steps."""

    def __init__(self, stage_first_epoch: int, steps_per_epoch: int) -> None:
        super().__init__()
        self.stage_first_epoch, self.steps_per_epoch = stage_first_epoch, steps_per_epoch
        self.done = False

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if not self.done:  # the first epoch of the retry, after BackupAndRestore restored the stage
            self.model.optimizer.iterations.assign((epoch - self.stage_first_epoch) * self.steps_per_epoch)
            self.done = True


def _preview_augmentation(config: ExperimentConfig, examples_dir: str | os.PathLike[str], output: Path) -> None:
    """The `segflow preview` grid of the first train examples and the resolved policy, in the
    run artifact: what this run's augmentation did, kept with the model it trained."""
    from segflow.data.examples import iter_split
    from segflow.train.preview import PreviewSettings, write_grid

    examples = [(example.filename, example.image, example.mask) for example, _ in zip(iter_split(examples_dir, "train"), range(PREVIEW_EXAMPLES))]
    settings = PreviewSettings(config.augmentation, config.ignore_index, config.shape, config.seed, config.patches)
    written = write_grid(settings, examples, output, PREVIEW_EXAMPLES)
    log(f"trainer: augmentation preview of {written['examples']} train examples in {output.parent.name}/{output.name}")


def trainer_settings(config: ExperimentConfig) -> str:
    """The config keys the trainer reads (its slice; the others are not its to show), as YAML."""
    from segflow.config.component_config import COMPONENT_KEYS

    sections = {key.split(".")[0] for key in COMPONENT_KEYS["trainer"]}
    return yaml.safe_dump({key: value for key, value in json.loads(config.to_json()).items() if key in sections}, sort_keys=False)


def _weights_digest(weights: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for array in weights:
        digest.update(json.dumps([str(array.dtype), list(array.shape)]).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _train(
    config: ExperimentConfig,
    plan: Plan,
    examples_dir: str | os.PathLike[str],
    transform_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    model_run_dir: str | os.PathLike[str],
    backup: Path,
) -> tuple[dict[str, Any], str]:
    """(final metrics, sha256 of the final weights). `backup` is read by every worker and
    written by the chief; another worker keeps its own stage weights and history beside its
    `model_run_dir` (a scratch folder)."""
    from segflow.components.transform.core import transform_layer
    from segflow.data.examples import read_counts

    keras.utils.set_random_seed(config.seed)
    _set_op_determinism(config.deterministic)
    class_weights = resolve_class_weights(config.class_weights, examples_dir, config.class_names)
    labels = LabelSpec(config.num_labels, config.sigmoid_head, config.ignore_index, class_weights)
    pixels = PixelSpec.load(transform_dir)
    tft_layer = transform_layer(transform_dir)
    counts = read_counts(examples_dir)
    inputs = train_inputs(config, examples_dir)

    def batching(batch: int) -> tuple[int, int, tf.data.Dataset]:
        """(global batch, steps per epoch, validation stream) at `batch` per replica."""
        global_batch = plan.global_batch(batch)
        if plan.replicas == 1:
            steps_per_epoch = math.ceil(inputs / global_batch)
            eval_batch, eval_drop = global_batch, False
        else:  # a short last batch could leave a replica empty: drop it (another one each epoch)
            if inputs < global_batch:
                raise ValueError(
                    f"trainer: {counts['train_examples']} training examples are fewer than one global batch of {global_batch} "
                    f"({batch} per replica x {plan.replicas} replicas); lower `batch`"
                )
            steps_per_epoch = inputs // global_batch
            eval_batch, eval_drop = evaluation_batch(counts["eval_examples"], plan.replicas, batch)
        return global_batch, steps_per_epoch, make_dataset(config, examples_dir, "eval", tft_layer, pixels, batch=eval_batch, drop_remainder=eval_drop)

    batch, halvings = config.batch, 0
    global_batch, steps_per_epoch, validation = batching(batch)
    network = _build_trained_network(config, plan)
    error_maps = _error_maps(config, examples_dir)
    log(f"trainer: {config.architecture}/{config.backbone}, {network.count_params():,} parameters, {config.total_epochs} epochs")
    if plan.replicas > 1 or plan.workers > 1:
        log(f"trainer: {plan.describe()}; global batch {global_batch} ({config.batch} per replica)")
    own_backup = backup if plan.chief else Path(model_run_dir).parent / BACKUP_FOLDER
    backup.mkdir(parents=True, exist_ok=True)
    own_backup.mkdir(parents=True, exist_ok=True)
    resumed = _completed_epochs(backup / HISTORY_FILE)  # the chief's history, read by every worker
    if resumed:
        log(f"trainer: {resumed} epochs finished before a restart; training continues at epoch {resumed + 1}")
    with atomic_dir(model_run_dir) as run_out:
        write_config_text(run_out / TENSORBOARD_FOLDER, trainer_settings(config))
        if config.augmentation:
            _preview_augmentation(config, examples_dir, run_out / AUGMENTATION_FOLDER / "preview.png")
        first_epoch = 0

        def fit_stage(number: int, stage: StageConfig, first_epoch: int, end_epoch: int) -> None:
            """One attempt at a stage at the current batch: BackupAndRestore continues it from
            its last finished epoch, the training stream starts at that epoch."""
            # A stage's own optimizer, schedule and callbacks replace the top-level ones whole.
            optimizer, schedule, watch = stage.optimizer or config.optimizer, stage.schedule or config.schedule, stage.callbacks or config.callbacks
            learning_rate = scaled_learning_rate(stage.learning_rate, plan.replicas, config.trainer.scale_learning_rate)
            with plan.strategy.scope():  # the schedule's scale and the optimizer's slots are variables
                rates = build_schedule(schedule, learning_rate, steps_per_epoch, stage.epochs)
                _compile(network, config, labels, build_optimizer(optimizer, rates), stage.loss, config.trainer.jit_compile)
            stage_backup = backup / f"stage-{number}"
            start = min(max(first_epoch, _completed_epochs(backup / HISTORY_FILE)), end_epoch) if stage_backup.is_dir() else first_epoch
            averaging = WeightAveraging(optimizer.swa_epochs, end_epoch) if optimizer.swa_epochs else None
            callbacks = [
                _StopOnNaN(number, own_backup / LAST_GOOD_FILE),  # before the backup: a diverged epoch is not backed up
                # Every worker gives the shared folder: tf_keras reads the chief's backup on all
                # of them and has the others write to temporary sub-folders it removes.
                keras.callbacks.BackupAndRestore(str(stage_backup), delete_checkpoint=True),
                *([_ResetSteps(first_epoch, steps_per_epoch)] if halvings else []),
                *([Lookahead(optimizer.lookahead)] if optimizer.lookahead else []),
                *([averaging] if averaging else []),
                LearningRateLogger(),  # before the loggers: they write what it adds
                _StepLogger(),
                *([_EpochLine("trainer", config.total_epochs)] if plan.chief else []),
                *([ReduceOnPlateau(rates, schedule.reduce_on_plateau, watch.monitor, watch.monitor_mode)] if schedule.reduce_on_plateau else []),
                *([KeepBest(run_out / CHECKPOINTS_FOLDER, number, watch)] if watch.keep_best else []),
                *early_stopping(watch),
                *live_predictions(watch, run_out / PREDICTIONS_FOLDER, validation, labels.num_labels, config.ignore_index, run_out / TENSORBOARD_FOLDER),
                keras.callbacks.CSVLogger(str(own_backup / HISTORY_FILE), append=True),
                keras.callbacks.TensorBoard(log_dir=str(run_out / TENSORBOARD_FOLDER), profile_batch=0),
                keras.callbacks.ModelCheckpoint(str(run_out / CHECKPOINTS_FOLDER / "last.weights.h5"), save_weights_only=True),
                *_fault_callbacks(plan),
                *([_refresh_error_maps(config, examples_dir, error_maps, network, tft_layer, pixels, end_epoch)] if error_maps else []),
            ]
            train = make_dataset(
                config, examples_dir, "train", tft_layer, pixels, epochs=(start, end_epoch), batch=global_batch, drop_remainder=plan.replicas > 1,
                negatives=stage.negatives, error_maps=error_maps,
            )
            with error_maps.serving() if error_maps else contextlib.nullcontext():
                network.fit(
                    train,
                    validation_data=validation,
                    steps_per_epoch=steps_per_epoch,
                    initial_epoch=first_epoch,
                    epochs=end_epoch,
                    callbacks=callbacks,
                    verbose=2,
                )
            if averaging and averaging.averaged:
                used = _refresh_batchnorm(config, stage, network, examples_dir, tft_layer, pixels, end_epoch)
                log(f"trainer: stage {number}: weights averaged over {averaging.averaged} epochs (SWA), BatchNorm statistics recomputed on {used} batches")

        for number, stage in enumerate(config.stages, start=1):
            finished = backup / f"stage-{number}.weights.h5"
            if finished.exists():
                network.load_weights(str(finished))
                log(f"trainer: stage {number}/{len(config.stages)} finished before a restart; weights restored from {finished}")
                first_epoch += stage.epochs
                continue
            log(
                f"trainer: stage {number}/{len(config.stages)}: {stage.epochs} epochs at learning rate "
                f"{scaled_learning_rate(stage.learning_rate, plan.replicas, config.trainer.scale_learning_rate):g} "
                f"({(stage.optimizer or config.optimizer).name}, {(stage.schedule or config.schedule).name} schedule, loss {stage.loss or config.loss})"
            )
            if stage.initial_weights:
                # Through a plain copy: tf_keras cannot load an .h5 file into a model built under MultiWorkerMirroredStrategy.
                loaded = build_network(config)
                loaded.load_weights(stage.initial_weights)
                network.set_weights(loaded.get_weights())
                log(f"trainer: stage {number}: initial weights from {stage.initial_weights}")
            if apply_stage_freeze(network, config.model, stage):  # before compiling: trainability is read at compile
                log(f"trainer: stage {number}: encoder frozen (its BatchNorm in inference mode)")
            end_epoch = first_epoch + stage.epochs
            start_weights = network.get_weights()
            while True:
                try:
                    fit_stage(number, stage, first_epoch, end_epoch)
                    break
                except tf.errors.ResourceExhaustedError as error:
                    reason = (error.message or str(error)).strip().splitlines()[0]
                    if batch == 1:
                        raise BatchTooLarge(
                            f"trainer: stage {number} runs out of memory even at batch 1 ({reason}); lower `shape` or the model's size"
                        ) from error
                    batch, halvings = batch // 2, halvings + 1
                    log(f"trainer: stage {number}: out of memory ({reason}); retrying the stage from its backup at batch {batch}")
                    network.set_weights(start_weights)  # the backup, if any, replaces them at the retry's start
                    global_batch, steps_per_epoch, validation = batching(batch)
            _save_weights_atomically(network, own_backup / finished.name)
            first_epoch = end_epoch
        write_json(
            run_out / TRAINING_FILE,
            {"batch": batch, "configured_batch": config.batch, "batch_halvings": halvings, "epochs_before_resume": resumed,
             "mixed_precision": config.trainer.mixed_precision, "jit_compile": config.trainer.jit_compile},
        )
        shutil.copyfile(own_backup / HISTORY_FILE, run_out / HISTORY_FILE)
        final = _last_epoch(run_out / HISTORY_FILE)  # the run's, also when every stage finished before a restart
        write_json(run_out / "final_metrics.json", final)
    weights = network.get_weights()  # on every worker: reading synced-on-read variables is a collective
    if plan.chief:
        served = network
        if plan.strategy is not tf.distribute.get_strategy() or config.trainer.mixed_precision:
            # A plain float32 copy outside any strategy: saving it needs no other worker, it loads
            # anywhere, and its exports compute in float32 whatever the training policy was.
            served = build_network(config)
            served.set_weights(weights)
            _compile(served, config, labels, keras.optimizers.Adam())
        with atomic_dir(model_dir) as model_out:
            (model_out / KERAS_FILE).parent.mkdir()
            served.save(str(model_out / KERAS_FILE))
            spec = ServingSpec(
                tuple(config.shape), tuple(config.class_names), config.sigmoid_head, config.ignore_index, pixels.input_dtype, pixels.value_max,
                config.patches.resize, config.patches.interpolation,
            )
            SegmentationServer(served, tft_layer, spec).save(model_out)
            if config.qat is not None:
                quantization_aware = _quantization_aware(config, served, labels, examples_dir, tft_layer, pixels, validation)
                SegmentationServer(quantization_aware, tft_layer, spec).save(model_out, QAT_SERVING_SUBDIR)
        shutil.rmtree(backup)  # the run is complete; nothing left to resume
    else:  # only the chief writes the model; this worker's scratch outputs go
        shutil.rmtree(own_backup, ignore_errors=True)
    log(f"trainer: final loss {final.get('loss', float('nan')):.4f}, validation mean IoU {final.get('val_mean_iou', float('nan')):.4f}")
    return final, _weights_digest(weights)


def _set_op_determinism(enabled: bool) -> None:
    """Op determinism is process-wide and TensorFlow only offers to switch it on: a process
    that trains several configs (lr-find, tests) must not carry one run's setting into the
    next, e.g. into XLA, which has no deterministic MaxPool gradient and then fails."""
    from tensorflow.python.framework import config as tf_config

    if enabled:
        tf.config.experimental.enable_op_determinism()
    else:
        tf_config.disable_op_determinism()


def _quantization_aware(
    config: ExperimentConfig,
    network: keras.Model,
    labels: LabelSpec,
    examples_dir: str | os.PathLike[str],
    tft_layer: Any,
    pixels: PixelSpec,
    validation: tf.data.Dataset,
) -> keras.Model:
    """The `qat` fine-tune (segflow.model.qat) of the final network, on the chief alone outside any
    strategy: the float model is already final, this copy is for the tflite_int8_qat export.
    Its epochs continue the training stream's numbering, so its augmentations are new ones."""
    from segflow.model.qat import quantization_aware

    settings, start = config.qat, config.total_epochs
    tuned = quantization_aware(network, config.architecture, network_spec(config))
    _compile(tuned, config, labels, keras.optimizers.Adam(settings.learning_rate))
    log(f"trainer: quantization-aware training (tensorflow-model-optimization): {settings.epochs} epochs at learning rate {settings.learning_rate:g}")
    fit = tuned.fit(
        make_dataset(config, examples_dir, "train", tft_layer, pixels, epochs=(start, start + settings.epochs)),
        validation_data=validation,
        steps_per_epoch=math.ceil(train_inputs(config, examples_dir) / config.batch),
        initial_epoch=start,
        epochs=start + settings.epochs,
        callbacks=[_EpochLine("trainer: quantization-aware training", settings.epochs, first=start)],
        verbose=2,
    )
    log(f"trainer: quantization-aware model: validation mean IoU {fit.history['val_mean_iou'][-1]:.4f} (fake-quantized)")
    return tuned


def _compile(
    network: keras.Model, config: ExperimentConfig, labels: LabelSpec, optimizer: Any, loss: str | None = None, jit_compile: bool = False
) -> None:
    """The loss (a stage's own, else the config's) and metrics of every compile: training
    stages (with `trainer.jit_compile`) and the chief's served copy."""
    metrics = SegmentationMetrics(labels.num_labels, labels.sigmoid, config.class_names)
    network.compile(optimizer=optimizer, loss=build_loss(loss or config.loss, labels), metrics=[metrics], jit_compile=jit_compile)


def _refresh_batchnorm(
    config: ExperimentConfig,
    stage: StageConfig,
    network: keras.Model,
    examples_dir: str | os.PathLike[str],
    tft_layer: Any,
    pixels: PixelSpec,
    end_epoch: int,
) -> int:
    """BatchNorm statistics of SWA's averaged weights, from the stage's last epoch of training
    batches (per-replica size, as in training). It runs on a plain copy outside any strategy
    over the unsharded stream, so every worker computes the same statistics; returns the batches used."""
    copy = build_network(config)
    apply_stage_freeze(copy, config.model, stage)
    copy.set_weights(network.get_weights())
    used = recompute_batchnorm(copy, make_dataset(config, examples_dir, "train", tft_layer, pixels, epochs=(end_epoch - 1, end_epoch)))
    network.set_weights(copy.get_weights())
    return used


def _build_trained_network(config: ExperimentConfig, plan: Plan) -> keras.Model:
    """The network to train, in the strategy's scope and under `trainer.mixed_precision`'s
    policy (its layers keep it; the global policy is restored, so every other copy is float32)."""
    policy = keras.mixed_precision.global_policy()
    if config.trainer.mixed_precision:
        keras.mixed_precision.set_global_policy(config.trainer.mixed_precision)
        if not tf.config.list_physical_devices("GPU"):
            log(f"trainer: note: {config.trainer.mixed_precision} on a CPU is usually slower than float32 (no float16 units); it pays on GPUs and TPUs")
    try:
        with plan.strategy.scope():
            return build_network(config)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def _last_epoch(history: Path) -> dict[str, float]:
    """The last row of a history.csv as {metric: value} ({} without epochs)."""
    import csv

    with open(history, newline="") as file:
        rows = list(csv.DictReader(file))
    return {key: float(value) for key, value in rows[-1].items() if key != "epoch" and value != ""} if rows else {}


def _completed_epochs(history: Path) -> int:
    """Epochs a run's history.csv records (one row each, after the header); 0 without one."""
    if not history.exists():
        return 0
    return max(len(history.read_text().splitlines()) - 1, 0)


def _save_weights_atomically(network: keras.Model, target: Path) -> None:
    partial = target.with_name(f".partial-{target.name}")  # the suffix picks the format: keep .weights.h5
    network.save_weights(str(partial))
    os.replace(partial, target)


def sweep_learning_rate(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    transform_dir: str | os.PathLike[str],
    rates: np.ndarray,
    divergence: float,
) -> list[float]:
    """The training loss of one step at each of `rates` in turn (the first stage's network,
    freezing, optimizer and loss on the augmented train stream), stopping early once a loss
    is not finite or exceeds `divergence` times the lowest so far. For `segflow lr-find` (segflow/pipelines/lr_find.py)."""
    from segflow.components.transform.core import transform_layer

    keras.utils.set_random_seed(config.seed)
    stage = config.stages[0]
    labels = LabelSpec(config.num_labels, config.sigmoid_head, config.ignore_index, resolve_class_weights(config.class_weights, examples_dir, config.class_names))
    network = build_network(config)
    apply_stage_freeze(network, config.model, stage)
    _compile(network, config, labels, build_optimizer(stage.optimizer or config.optimizer, float(rates[0])), stage.loss)
    steps_per_epoch = math.ceil(train_inputs(config, examples_dir) / config.batch)
    epochs = math.ceil(len(rates) / steps_per_epoch)
    train = make_dataset(config, examples_dir, "train", transform_layer(transform_dir), PixelSpec.load(transform_dir), epochs=(0, epochs))
    step = tf.function(lambda images, masks: network.train_step((images, masks))["loss"])
    losses: list[float] = []
    for value, (images, masks) in zip(rates, train):
        network.optimizer.learning_rate = float(value)  # assigns the optimizer's rate variable
        network.reset_metrics()  # the compiled loss is a running mean: one batch each
        loss = float(step(images, masks))
        if not math.isfinite(loss):
            break
        losses.append(loss)
        if loss > divergence * min(losses):
            break
    return losses
