"""Learning-rate schedules (registry `schedules`) and the callbacks that steer them.

A schedule entry maps the optimizer's step (within a stage: every stage compiles a new
optimizer) to a rate, as TensorFlow ops so that it runs inside the compiled train step.
Lengths are given in epochs and turned into steps with the stage's steps per epoch, so one
config means the same thing on 20 or 20,000 examples. `StageSchedule` wraps the entry with
an optional linear warmup and a `scale` variable: ReduceLROnPlateau multiplies `scale`,
which lowers every later value, for a cyclical schedule its peak.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import tensorflow as tf
import tf_keras as keras

from segflow.config.experiment import PlateauConfig, ScheduleConfig
from segflow.utils.registry import SCHEDULES


@dataclass(frozen=True)
class ScheduleSpan:
    """What a schedule needs besides its settings: the peak rate and the stage's length in steps."""

    learning_rate: float
    steps_per_epoch: int
    total_steps: int


Curve = Callable[[tf.Tensor, ScheduleConfig, ScheduleSpan], tf.Tensor]


def schedule(name: str) -> Callable[[Curve], Curve]:
    return SCHEDULES.register(name)


@schedule("constant")
def constant(step: tf.Tensor, settings: ScheduleConfig, span: ScheduleSpan) -> tf.Tensor:
    """The stage's learning rate throughout (the default)."""
    return tf.fill(tf.shape(step), tf.constant(span.learning_rate, tf.float32))


@schedule("exponential")
def exponential(step: tf.Tensor, settings: ScheduleConfig, span: ScheduleSpan) -> tf.Tensor:
    """learning_rate * decay_rate ** (epochs elapsed / decay_epochs), continuous."""
    period = settings.decay_epochs * span.steps_per_epoch
    return span.learning_rate * tf.pow(tf.constant(settings.decay_rate, tf.float32), step / period)


def _progress(step: tf.Tensor, span: ScheduleSpan) -> tf.Tensor:
    """Share of the stage's steps done, in [0, 1]."""
    return tf.minimum(step, float(span.total_steps)) / float(max(span.total_steps, 1))


@schedule("polynomial")
def polynomial(step: tf.Tensor, settings: ScheduleConfig, span: ScheduleSpan) -> tf.Tensor:
    """From learning_rate to min_learning_rate over the stage: (1 - progress) ** power."""
    low = settings.min_learning_rate
    return (span.learning_rate - low) * tf.pow(1.0 - _progress(step, span), settings.power) + low


@schedule("cosine")
def cosine(step: tf.Tensor, settings: ScheduleConfig, span: ScheduleSpan) -> tf.Tensor:
    """Half a cosine from learning_rate to min_learning_rate over the stage (after any warmup)."""
    low = settings.min_learning_rate
    return low + (span.learning_rate - low) * 0.5 * (1.0 + tf.cos(math.pi * _progress(step, span)))


@schedule("cyclical")
def cyclical(step: tf.Tensor, settings: ScheduleConfig, span: ScheduleSpan) -> tf.Tensor:
    """Cyclical (Smith 2017): min_learning_rate up to learning_rate and back every cycle_epochs.

    mode triangular keeps the amplitude, triangular2 halves it every cycle, exp_range
    multiplies it by gamma per epoch."""
    low = settings.min_learning_rate
    cycle_steps = settings.cycle_epochs * span.steps_per_epoch
    cycle = tf.floor(1.0 + step / cycle_steps)
    position = tf.abs(2.0 * step / cycle_steps - 2.0 * cycle + 1.0)
    amplitude = (span.learning_rate - low) * tf.maximum(0.0, 1.0 - position)
    if settings.mode == "triangular2":
        amplitude = amplitude / tf.pow(2.0, cycle - 1.0)
    elif settings.mode == "exp_range":
        amplitude = amplitude * tf.pow(tf.constant(settings.gamma, tf.float32), step / span.steps_per_epoch)
    return low + amplitude


@keras.saving.register_keras_serializable(package="segflow")
class StageSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A registered curve after `warmup_epochs` of linear warmup from 0, times `scale`."""

    def __init__(self, settings: dict[str, Any], learning_rate: float, steps_per_epoch: int, total_steps: int) -> None:
        self.settings = ScheduleConfig.model_validate(settings)
        self.learning_rate = learning_rate
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.warmup_steps = self.settings.warmup_epochs * steps_per_epoch
        self.curve = SCHEDULES.get(self.settings.name)
        self.span = ScheduleSpan(learning_rate, steps_per_epoch, max(total_steps - math.ceil(self.warmup_steps), 1))
        # Lowered by ReduceOnPlateau; created in the strategy scope with the optimizer.
        self.scale = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="learning_rate_scale")

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        step = tf.cast(step, tf.float32)
        if self.warmup_steps > 0:
            warm = self.curve(tf.zeros_like(step), self.settings, self.span) * step / self.warmup_steps
            value = tf.where(step < self.warmup_steps, warm, self.curve(tf.maximum(step - self.warmup_steps, 0.0), self.settings, self.span))
        else:
            value = self.curve(step, self.settings, self.span)
        return self.scale * value

    def get_config(self) -> dict[str, Any]:
        return {
            "settings": self.settings.model_dump(mode="json"),
            "learning_rate": self.learning_rate,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
        }


def build_schedule(settings: ScheduleConfig, learning_rate: float, steps_per_epoch: int, epochs: int) -> StageSchedule:
    """The stage's schedule; build it in the strategy scope (its scale is a variable)."""
    return StageSchedule(settings.model_dump(mode="json"), learning_rate, steps_per_epoch, steps_per_epoch * epochs)


class LearningRateLogger(keras.callbacks.Callback):
    """Puts the rate of the epoch's last step in the logs as `lr` (tf_keras keeps a schedule's
    value of the last step), so the history CSV and TensorBoard show what the schedule and the
    plateau reductions did. Place it before them. `lr` as Keras 2's own callbacks name it; it
    also sorts after `loss`, so history.csv keeps epoch, loss as its first columns."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["lr"] = float(keras.backend.get_value(self.model.optimizer.learning_rate))  # a MirroredVariable under a strategy


class ReduceOnPlateau(keras.callbacks.Callback):
    """ReduceLROnPlateau for schedules: tf_keras' own sets a fixed rate, which would replace
    the schedule. This one multiplies the schedule's scale by `factor` when `monitor` has not
    improved for `patience` epochs (the later values, a cyclical peak included, go down)."""

    def __init__(self, schedule: StageSchedule, settings: PlateauConfig, monitor: str, mode: str) -> None:
        super().__init__()
        self.schedule = schedule
        self.settings = settings
        self.monitor = monitor
        self.sign = 1.0 if mode == "max" else -1.0
        self.best = -math.inf
        self.wait = 0
        self.cooldown = 0

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise KeyError(f"reduce_on_plateau monitors {self.monitor!r}, which is not among this epoch's logs: {sorted(logs or {})}")
        score = self.sign * float(value)
        if self.cooldown > 0:
            self.cooldown -= 1
            self.wait = 0
        if score > self.best + self.settings.min_delta:
            self.best, self.wait = score, 0
            return
        self.wait += 1
        scale = float(self.schedule.scale.numpy())
        if self.wait >= self.settings.patience and self.cooldown == 0 and scale > self.settings.min_scale:
            self.schedule.scale.assign(max(scale * self.settings.factor, self.settings.min_scale))
            self.wait, self.cooldown = 0, self.settings.cooldown
