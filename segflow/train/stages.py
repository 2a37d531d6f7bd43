"""The training stages, moved out of the trainer core: they run one after another on the same
weights, each with its optimizer, schedule, loss, freezing and callbacks (the top-level
ones unless it has its own), and each resumable.

Resume: `backup/` (beside the trainer's outputs) holds a finished stage's weights
(`stage-<n>.weights.h5`), the running stage's BackupAndRestore folder (`stage-<n>/`) and the
chief's history.csv; a restarted run restores the finished stages and continues the running
one at its last finished epoch. Out of memory and NaN losses: segflow.train.robustness.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tf_keras as keras

from segflow.config.experiment import CallbacksConfig, ExperimentConfig, OptimizerConfig, ScheduleConfig, StageConfig
from segflow.data.error_maps import ErrorMaps
from segflow.data.preprocessing import PixelSpec
from segflow.evaluate.analyze import HISTORY_FILE
from segflow.model.losses import LabelSpec
from segflow.model.models import apply_stage_freeze
from segflow.train.callbacks import CHECKPOINTS_FOLDER, PREDICTIONS_FOLDER, KeepBest, early_stopping, live_predictions
from segflow.train.distribute import Plan, scaled_learning_rate
from segflow.train.hard_negatives import refresh_error_maps
from segflow.train.input_pipeline import make_dataset
from segflow.train.multiworker import fault_callbacks
from segflow.train.network import build_network, compile_network
from segflow.train.optimizers import Lookahead, WeightAveraging, build_optimizer, recompute_batchnorm
from segflow.train.progress import EpochLine, StepLogger
from segflow.train.robustness import LAST_GOOD_FILE, Batching, ResetSteps, StopOnNaN, fit_halving_the_batch, save_weights_atomically
from segflow.train.schedules import LearningRateLogger, ReduceOnPlateau, build_schedule
from segflow.utils.runtime import log
from segflow.utils.storage import localized

TENSORBOARD_FOLDER = "logs"  # in model_run/: Keras' scalars, prediction panels, the resolved config


@dataclass
class StageRun:
    """What every stage of one run shares. `backup` is read by every worker and written by
    the chief; `own_backup` is where this worker writes (the chief's is `backup`); `run_out`
    is the model_run folder being written; `batching` changes when out of memory halves the batch."""

    config: ExperimentConfig
    plan: Plan
    examples_dir: str | os.PathLike[str]
    labels: LabelSpec
    pixels: PixelSpec
    tft_layer: Any
    network: keras.Model
    error_maps: ErrorMaps | None
    batching: Batching
    backup: Path
    own_backup: Path
    run_out: Path


def completed_epochs(history: Path) -> int:
    """Epochs a run's history.csv records (one row each, after the header); 0 without one."""
    if not history.exists():
        return 0
    return max(len(history.read_text().splitlines()) - 1, 0)


def last_epoch(history: Path) -> dict[str, float]:
    """The last row of a history.csv as {metric: value} ({} without epochs)."""
    import csv

    with open(history, newline="") as file:
        rows = list(csv.DictReader(file))
    return {key: float(value) for key, value in rows[-1].items() if key != "epoch" and value != ""} if rows else {}


def stage_settings(config: ExperimentConfig, stage: StageConfig) -> tuple[OptimizerConfig, ScheduleConfig, CallbacksConfig]:
    """A stage's own optimizer, schedule and callbacks replace the top-level ones whole."""
    return stage.optimizer or config.optimizer, stage.schedule or config.schedule, stage.callbacks or config.callbacks


def train_stages(run: StageRun) -> None:
    """Every stage in turn on the same weights. A stage that finished before a restart (its
    weights in backup/) is restored, not trained again; each one's weights are backed up as it ends."""
    config, network = run.config, run.network
    first_epoch = 0
    for number, stage in enumerate(config.stages, start=1):
        finished = run.backup / f"stage-{number}.weights.h5"
        if finished.exists():
            network.load_weights(str(finished))
            log(f"trainer: stage {number}/{len(config.stages)} finished before a restart; weights restored from {finished}")
            first_epoch += stage.epochs
            continue
        _start_stage(run, number, stage)
        end_epoch = first_epoch + stage.epochs
        fit_halving_the_batch(number, functools.partial(fit_stage, run, number, stage, first_epoch, end_epoch), network, run.batching)
        save_weights_atomically(network, run.own_backup / finished.name)
        first_epoch = end_epoch


def _start_stage(run: StageRun, number: int, stage: StageConfig) -> None:
    """Before a stage's first attempt: its console line, its initial weights, its frozen encoder."""
    config, plan, network = run.config, run.plan, run.network
    log(
        f"trainer: stage {number}/{len(config.stages)}: {stage.epochs} epochs at learning rate "
        f"{scaled_learning_rate(stage.learning_rate, plan.replicas, config.trainer.scale_learning_rate):g} "
        f"({(stage.optimizer or config.optimizer).name}, {(stage.schedule or config.schedule).name} schedule, loss {stage.loss or config.loss})"
    )
    if stage.initial_weights:
        # Through a plain copy: tf_keras cannot load an .h5 file into a model built under MultiWorkerMirroredStrategy.
        loaded = build_network(config)
        with localized(stage.initial_weights) as weights:  # a registry version may be in gs:// or s3://
            loaded.load_weights(weights)
        network.set_weights(loaded.get_weights())
        log(f"trainer: stage {number}: initial weights from {stage.initial_weights}")
    if apply_stage_freeze(network, config.model, stage):  # before compiling: trainability is read at compile
        log(f"trainer: stage {number}: encoder frozen (its BatchNorm in inference mode)")


def fit_stage(run: StageRun, number: int, stage: StageConfig, first_epoch: int, end_epoch: int) -> None:
    """One attempt at a stage at the current batch: BackupAndRestore continues it from
    its last finished epoch, the training stream starts at that epoch."""
    config, plan, batching, network, error_maps = run.config, run.plan, run.batching, run.network, run.error_maps
    optimizer, schedule, _ = stage_settings(config, stage)
    learning_rate = scaled_learning_rate(stage.learning_rate, plan.replicas, config.trainer.scale_learning_rate)
    with plan.strategy.scope():  # the schedule's scale and the optimizer's slots are variables
        rates = build_schedule(schedule, learning_rate, batching.steps_per_epoch, stage.epochs)
        compile_network(network, config, run.labels, build_optimizer(optimizer, rates), stage.loss, config.trainer.jit_compile)
    stage_backup = run.backup / f"stage-{number}"
    start = min(max(first_epoch, completed_epochs(run.backup / HISTORY_FILE)), end_epoch) if stage_backup.is_dir() else first_epoch
    averaging = WeightAveraging(optimizer.swa_epochs, end_epoch) if optimizer.swa_epochs else None
    callbacks = _stage_callbacks(run, number, stage, first_epoch, end_epoch, rates, averaging)
    train = make_dataset(
        config, run.examples_dir, "train", run.tft_layer, run.pixels, epochs=(start, end_epoch), batch=batching.global_batch, drop_remainder=plan.replicas > 1,
        negatives=stage.negatives, error_maps=error_maps,
    )
    with error_maps.serving() if error_maps else contextlib.nullcontext():
        network.fit(
            train,
            validation_data=batching.validation,
            steps_per_epoch=batching.steps_per_epoch,
            initial_epoch=first_epoch,
            epochs=end_epoch,
            callbacks=callbacks,
            verbose=2,
        )
    if averaging and averaging.averaged:
        used = _refresh_batchnorm(config, stage, network, run.examples_dir, run.tft_layer, run.pixels, end_epoch)
        log(f"trainer: stage {number}: weights averaged over {averaging.averaged} epochs (SWA), BatchNorm statistics recomputed on {used} batches")


def _stage_callbacks(
    run: StageRun, number: int, stage: StageConfig, first_epoch: int, end_epoch: int, rates: Any, averaging: WeightAveraging | None
) -> list[keras.callbacks.Callback]:
    """A stage attempt's callbacks, in the order they must run (the comments say why)."""
    config, plan, batching, run_out, own_backup = run.config, run.plan, run.batching, run.run_out, run.own_backup
    optimizer, schedule, watch = stage_settings(config, stage)
    return [
        StopOnNaN(number, own_backup / LAST_GOOD_FILE),  # before the backup: a diverged epoch is not backed up
        # Every worker gives the shared folder: tf_keras reads the chief's backup on all
        # of them and has the others write to temporary sub-folders it removes.
        keras.callbacks.BackupAndRestore(str(run.backup / f"stage-{number}"), delete_checkpoint=True),
        *([ResetSteps(first_epoch, batching.steps_per_epoch)] if batching.halvings else []),
        *([Lookahead(optimizer.lookahead)] if optimizer.lookahead else []),
        *([averaging] if averaging else []),
        LearningRateLogger(),  # before the loggers: they write what it adds
        StepLogger(),
        *([EpochLine("trainer", config.total_epochs)] if plan.chief else []),
        *([ReduceOnPlateau(rates, schedule.reduce_on_plateau, watch.monitor, watch.monitor_mode)] if schedule.reduce_on_plateau else []),
        *([KeepBest(run_out / CHECKPOINTS_FOLDER, number, watch)] if watch.keep_best else []),
        *early_stopping(watch),
        *live_predictions(watch, run_out / PREDICTIONS_FOLDER, batching.validation, run.labels.num_labels, config.ignore_index, run_out / TENSORBOARD_FOLDER),
        keras.callbacks.CSVLogger(str(own_backup / HISTORY_FILE), append=True),
        keras.callbacks.TensorBoard(log_dir=str(run_out / TENSORBOARD_FOLDER), profile_batch=0),
        keras.callbacks.ModelCheckpoint(str(run_out / CHECKPOINTS_FOLDER / "last.weights.h5"), save_weights_only=True),
        *fault_callbacks(plan),
        *([refresh_error_maps(config, run.examples_dir, run.error_maps, run.network, run.tft_layer, run.pixels, end_epoch)] if run.error_maps else []),
    ]


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
