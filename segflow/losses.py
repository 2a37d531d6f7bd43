"""Segmentation losses on logits, all respecting `ignore_index`, registered by name.

Each loss takes integer labels [B,H,W] (or [B,H,W,1]) and logits [B,H,W,K]; K is 1 for a
sigmoid head. Pixels labelled `ignore_index` contribute nothing to any loss.
`crossentropy+0.5*dice` builds a weighted sum (see segflow.config.parse_loss).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import tensorflow as tf

from segflow.registry import LOSSES

EPSILON = 1e-6


@dataclass(frozen=True)
class LabelSpec:
    num_labels: int
    sigmoid: bool = False
    ignore_index: int | None = None


LossFn = Callable[[tf.Tensor, tf.Tensor, LabelSpec], tf.Tensor]


def _prepare(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Labels as int32 [B,H,W] with ignored pixels set to 0, a float validity mask, float logits."""
    labels = tf.cast(labels, tf.int32)
    if labels.shape.rank == 4:
        labels = labels[..., 0]
    if logits.shape.rank == 3:  # Keras squeezes a sigmoid head's [B,H,W,1] to match [B,H,W] labels
        logits = logits[..., None]
    if spec.ignore_index is None:
        valid = tf.ones_like(labels, tf.float32)
    else:
        valid = tf.cast(tf.not_equal(labels, spec.ignore_index), tf.float32)
        labels = tf.where(labels == spec.ignore_index, tf.zeros_like(labels), labels)
    return labels, valid, tf.cast(logits, tf.float32)


def probabilities(logits: tf.Tensor, sigmoid: bool) -> tf.Tensor:
    """Per-class probabilities [B,H,W,num_labels]; a sigmoid head becomes [1-p, p]."""
    logits = tf.cast(logits, tf.float32)
    if sigmoid:
        foreground = tf.sigmoid(logits)
        return tf.concat([1.0 - foreground, foreground], axis=-1)
    return tf.nn.softmax(logits, axis=-1)


def _masked_mean(values: tf.Tensor, valid: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(values * valid) / tf.maximum(tf.reduce_sum(valid), 1.0)


def _pixel_crossentropy(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec) -> tf.Tensor:
    if spec.sigmoid:
        return tf.nn.sigmoid_cross_entropy_with_logits(tf.cast(labels, tf.float32), logits[..., 0])
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)


@LOSSES.register("crossentropy")
def crossentropy(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec) -> tf.Tensor:
    """Pixel-wise softmax (or sigmoid) cross-entropy, averaged over labelled pixels."""
    labels, valid, logits = _prepare(labels, logits, spec)
    return _masked_mean(_pixel_crossentropy(labels, logits, spec), valid)


@LOSSES.register("focal")
def focal(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec, gamma: float = 2.0) -> tf.Tensor:
    """Focal loss (Lin et al. 2017, gamma 2): down-weights pixels the model already gets right."""
    labels, valid, logits = _prepare(labels, logits, spec)
    probs = probabilities(logits, spec.sigmoid)
    true_prob = tf.reduce_sum(probs * tf.one_hot(labels, spec.num_labels), axis=-1)
    weight = tf.pow(1.0 - true_prob, gamma)
    return _masked_mean(weight * _pixel_crossentropy(labels, logits, spec), valid)


def _soft_overlap(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Per-class soft intersection, prediction sum and target sum over labelled pixels."""
    labels, valid, logits = _prepare(labels, logits, spec)
    probs = probabilities(logits, spec.sigmoid) * valid[..., None]
    target = tf.one_hot(labels, spec.num_labels) * valid[..., None]
    axes = [0, 1, 2]
    intersection = tf.reduce_sum(probs * target, axis=axes)
    predicted = tf.reduce_sum(probs, axis=axes)
    actual = tf.reduce_sum(target, axis=axes)
    if spec.sigmoid:  # the foreground channel carries the signal of a binary mask
        return intersection[1:], predicted[1:], actual[1:]
    return intersection, predicted, actual


@LOSSES.register("dice")
def dice(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec) -> tf.Tensor:
    """Soft Dice loss (Milletari et al. 2016), averaged over classes."""
    intersection, predicted, actual = _soft_overlap(labels, logits, spec)
    score = (2.0 * intersection + EPSILON) / (predicted + actual + EPSILON)
    return 1.0 - tf.reduce_mean(score)


@LOSSES.register("jaccard")
def jaccard(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec) -> tf.Tensor:
    """Soft Jaccard (IoU) loss, averaged over classes."""
    intersection, predicted, actual = _soft_overlap(labels, logits, spec)
    score = (intersection + EPSILON) / (predicted + actual - intersection + EPSILON)
    return 1.0 - tf.reduce_mean(score)


LOSSES.add("ce", crossentropy)
LOSSES.add("bce", crossentropy)
LOSSES.add("iou", jaccard)


def build_loss(expression: str, spec: LabelSpec) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """A Keras loss function for a weighted sum such as `crossentropy+0.5*dice`."""
    from segflow.config import parse_loss

    terms = [(weight, LOSSES.get(name)) for weight, name in parse_loss(expression)]

    def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return tf.add_n([weight * fn(y_true, y_pred, spec) for weight, fn in terms])

    loss.__name__ = "segmentation_loss"
    return loss
