"""What the trainer reports per epoch, moved out of the trainer core: segflow's console line
(Keras' own verbose=2 lines go to the log file only) and the optimizer's step count in the
epoch's logs (history.csv `optimizer_steps`).
"""
from __future__ import annotations

import time
from typing import Any

import tf_keras as keras

from segflow.utils.runtime import log


class StepLogger(keras.callbacks.Callback):
    """Adds the optimizer's step count to each epoch's logs (history.csv `optimizer_steps`),
    which shows that a resumed stage continues its count and its schedule where it stopped."""

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if logs is not None:
            logs["optimizer_steps"] = int(self.model.optimizer.iterations.numpy())


class EpochLine(keras.callbacks.Callback):
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
