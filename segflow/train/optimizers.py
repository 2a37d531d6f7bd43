"""Optimizers (registry `optimizers`), Lookahead and stochastic weight averaging.

tf_keras 2.21 has Adam, AdamW, SGD and RMSprop but no RAdam and no Lookahead, and
tensorflow-addons (which had both) is unmaintained; RAdam is written here as a tf_keras
optimizer, Lookahead and SWA as callbacks that keep their extra copy of the weights, so they
combine with any optimizer and work unchanged under a distribution strategy (every worker
runs the same callbacks on the same values).

Restarts (BackupAndRestore) restore the optimizer, not these copies: after a resume the
Lookahead slow weights start from the restored weights and the SWA mean from the resumed epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import tensorflow as tf
import tf_keras as keras

from segflow.config.experiment import LookaheadConfig, OptimizerConfig
from segflow.utils.registry import OPTIMIZERS


@dataclass(frozen=True)
class OptimizerEntry:
    """A registered optimizer: its factory and the optional settings it accepts."""

    build: Callable[[Any, OptimizerConfig], keras.optimizers.Optimizer]
    parameters: frozenset[str]
    description: str


def _common(settings: OptimizerConfig) -> dict[str, Any]:
    """Keyword arguments every tf_keras optimizer takes; unset ones keep its defaults."""
    common: dict[str, Any] = {"clipnorm": settings.clipnorm}
    if settings.weight_decay is not None:
        common["weight_decay"] = settings.weight_decay
    return common


OPTIMIZERS.add(
    "adam", OptimizerEntry(lambda rate, s: keras.optimizers.Adam(rate, **_common(s)), frozenset(), "Adam (Kingma & Ba 2014), the default")
)
OPTIMIZERS.add(
    "adamw",
    OptimizerEntry(lambda rate, s: keras.optimizers.AdamW(rate, **_common(s)), frozenset(), "AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019)"),
)
OPTIMIZERS.add(
    "sgd",
    OptimizerEntry(
        lambda rate, s: keras.optimizers.SGD(rate, momentum=s.momentum, nesterov=s.nesterov, **_common(s)),
        frozenset({"momentum", "nesterov"}),
        "SGD with optional (Nesterov) momentum",
    ),
)
OPTIMIZERS.add(
    "rmsprop",
    OptimizerEntry(lambda rate, s: keras.optimizers.RMSprop(rate, momentum=s.momentum, **_common(s)), frozenset({"momentum"}), "RMSprop (Hinton)"),
)


@keras.saving.register_keras_serializable(package="segflow")
class RAdam(keras.optimizers.Optimizer):
    """Rectified Adam (Liu et al. 2020): Adam whose adaptive step is scaled by the rectification
    term r_t once the variance estimate is tractable (rho_t > 5), plain momentum SGD before."""

    def __init__(
        self, learning_rate: Any = 0.001, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7, name: str = "RAdam", **kwargs: Any
    ) -> None:
        super().__init__(name=name, **kwargs)
        self._learning_rate = self._build_learning_rate(learning_rate)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon

    def build(self, var_list: list[tf.Variable]) -> None:
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self._built = True
        self._momentums = [self.add_variable_from_reference(model_variable=var, variable_name="m") for var in var_list]
        self._velocities = [self.add_variable_from_reference(model_variable=var, variable_name="v") for var in var_list]

    def update_step(self, gradient: tf.Tensor, variable: tf.Variable) -> None:
        dtype = variable.dtype
        gradient = tf.convert_to_tensor(gradient)  # IndexedSlices (embeddings) densified: segmentation nets have none
        lr = tf.cast(self.learning_rate, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        beta_1_power, beta_2_power = tf.pow(beta_1, step), tf.pow(beta_2, step)
        index = self._index_dict[self._var_key(variable)]
        m, v = self._momentums[index], self._velocities[index]
        m.assign(beta_1 * m + (1 - beta_1) * gradient)
        v.assign(beta_2 * v + (1 - beta_2) * tf.square(gradient))
        m_hat = m / (1 - beta_1_power)
        rho_inf = 2 / (1 - beta_2) - 1
        rho = rho_inf - 2 * step * beta_2_power / (1 - beta_2_power)
        rectifier = tf.sqrt(tf.maximum((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho), 0.0))
        adaptive = rectifier * m_hat / (tf.sqrt(v / (1 - beta_2_power)) + self.epsilon)
        variable.assign_sub(lr * tf.where(rho > 5, adaptive, m_hat))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {"learning_rate": self._serialize_hyperparameter(self._learning_rate), "beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon}
        )
        return config


OPTIMIZERS.add("radam", OptimizerEntry(lambda rate, s: RAdam(rate, **_common(s)), frozenset(), "RAdam (Liu et al. 2020); with lookahead it is Ranger"))


def build_optimizer(settings: OptimizerConfig, learning_rate: Any) -> keras.optimizers.Optimizer:
    """The stage's optimizer at `learning_rate` (a rate or a schedule); build it in the strategy scope."""
    return OPTIMIZERS.get(settings.name).build(learning_rate, settings)


class Lookahead(keras.callbacks.Callback):
    """Lookahead (Zhang et al. 2019) around whatever optimizer the model has: every
    `sync_period` steps the slow weights move `slow_step` of the way to the fast (trained)
    weights, and the fast weights restart from them. The slow copy covers the trainable
    weights, the ones the optimizer moves."""

    def __init__(self, settings: LookaheadConfig) -> None:
        super().__init__()
        self.settings = settings
        self.slow: list[tf.Tensor] = []
        self.steps = 0

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.slow = [tf.identity(variable) for variable in self.model.trainable_variables]
        self.steps = 0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.steps += 1
        if self.steps % self.settings.sync_period:
            return
        alpha = self.settings.slow_step
        for index, variable in enumerate(self.model.trainable_variables):
            slow = self.slow[index] + alpha * (tf.convert_to_tensor(variable) - self.slow[index])
            variable.assign(slow)
            self.slow[index] = slow


class WeightAveraging(keras.callbacks.Callback):
    """Stochastic weight averaging (Izmailov et al. 2018): the running mean of all weights
    after each of the stage's last `epochs` epochs replaces the weights when the stage ends.
    BatchNorm statistics of the mean are not the mean of the statistics: recompute them
    afterwards (`recompute_batchnorm`)."""

    def __init__(self, epochs: int, last_epoch: int) -> None:
        super().__init__()
        self.first = last_epoch - epochs  # 0-based index of the first averaged epoch
        self.mean: list[np.ndarray] = []
        self.count = 0

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch < self.first:
            return
        weights = self.model.get_weights()
        self.count += 1
        if self.count == 1:
            self.mean = [np.array(array, np.float64) for array in weights]
        else:
            for mean, array in zip(self.mean, weights):
                mean += (array - mean) / self.count

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.count:
            self.model.set_weights([mean.astype(array.dtype) for mean, array in zip(self.mean, self.model.get_weights())])

    @property
    def averaged(self) -> int:
        """How many epochs went into the mean (fewer than asked after early stopping or a resume)."""
        return self.count


def recompute_batchnorm(model: keras.Model, batches: Iterable[tuple[tf.Tensor, tf.Tensor]]) -> int:
    """Set every trainable BatchNorm layer's moving mean and variance to the plain average of
    its batch statistics over `batches` (images, masks), run in training mode; returns the
    batches used. Layers of a frozen encoder run in inference mode and keep their statistics."""
    layers = [layer for layer in _layers(model) if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    count = 0
    try:
        for images, _ in batches:
            for layer in layers:  # new = old * n/(n+1) + batch/(n+1): the mean of the n+1 batches
                layer.momentum = count / (count + 1)
            model(images, training=True)
            count += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return count


def _layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer, nested models included (backbones are sub-models)."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(_layers(layer))
    return found
