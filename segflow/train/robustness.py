"""What keeps a training run alive or stops it cleanly, moved out of the trainer core.

Out of memory (a ResourceExhaustedError) during a stage halves the batch and retries the
stage from its backup, down to batch 1 (`fit_halving_the_batch`, then `BatchTooLarge`); a NaN
or infinite loss stops training with `TrainingDiverged` and leaves the last good weights in
`backup/` (`StopOnNaN`). Weights files are written atomically, so a crash never leaves a
half-written one where a restart would read it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf
import tf_keras as keras

from segflow.utils.runtime import log

LAST_GOOD_FILE = "last-good.weights.h5"  # in backup/ after a diverged stage: the weights before it


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: continuing would only spread it through the weights."""


class BatchTooLarge(RuntimeError):
    """Out of memory even at batch 1."""


class StopOnNaN(keras.callbacks.Callback):
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
        save_weights_atomically(self.model, self.last_good)
        raise TrainingDiverged(
            f"trainer: stage {self.stage}, epoch {self.epoch + 1} ({where}): {', '.join(f'{k} {v}' for k, v in bad.items())}; training stopped. "
            f"The weights at the start of epoch {self.epoch + 1} are in {self.last_good} (the stage's own checkpoint of that epoch in {self.last_good.parent / f'stage-{self.stage}'}); "
            "lower the learning rate, or restart from them with stages[].initial_weights"
        )


class ResetSteps(keras.callbacks.Callback):
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


def save_weights_atomically(network: keras.Model, target: Path) -> None:
    """Write `target` under a temporary name, then rename it: a crash never leaves half a file there."""
    partial = target.with_name(f".partial-{target.name}")  # the suffix picks the format: keep .weights.h5
    network.save_weights(str(partial))
    os.replace(partial, target)


@dataclass
class Batching:
    """The per-replica batch a run trains at now, how often running out of memory halved it,
    and what follows from it: `resize(batch)` gives (global batch, steps per epoch, validation stream)."""

    resize: Callable[[int], tuple[int, int, tf.data.Dataset]]
    batch: int
    halvings: int = 0
    global_batch: int = field(init=False)
    steps_per_epoch: int = field(init=False)
    validation: tf.data.Dataset = field(init=False)

    def __post_init__(self) -> None:
        self.global_batch, self.steps_per_epoch, self.validation = self.resize(self.batch)


def fit_halving_the_batch(number: int, fit: Callable[[], None], network: keras.Model, batching: Batching) -> None:
    """Run stage `number` (`fit`: one attempt at the current batch) until it fits in memory:
    each ResourceExhaustedError halves `batching` and retries from the stage's start weights
    (its backup, if any, replaces them at the retry's start); at batch 1 it gives up."""
    start_weights = network.get_weights()
    while True:
        try:
            fit()
            break
        except tf.errors.ResourceExhaustedError as error:
            reason = (error.message or str(error)).strip().splitlines()[0]
            if batching.batch == 1:
                raise BatchTooLarge(
                    f"trainer: stage {number} runs out of memory even at batch 1 ({reason}); lower `shape` or the model's size"
                ) from error
            batching.batch, batching.halvings = batching.batch // 2, batching.halvings + 1
            log(f"trainer: stage {number}: out of memory ({reason}); retrying the stage from its backup at batch {batching.batch}")
            network.set_weights(start_weights)  # the backup, if any, replaces them at the retry's start
            batching.global_batch, batching.steps_per_epoch, batching.validation = batching.resize(batching.batch)
