"""Segmentation losses on logits, all respecting `ignore_index` and class weights, registered by name.

Each loss takes integer labels [B,H,W] (or [B,H,W,1]) and logits [B,H,W,K]; K is 1 for a
sigmoid head. Pixels labelled `ignore_index` contribute nothing to any loss, their logits
get no gradient. `LabelSpec.class_weights` (config `class_weights`) weights pixel losses
per pixel by its true class (a weighted mean, as PyTorch's `CrossEntropyLoss(weight=)`)
and region losses (Dice, Jaccard, Lovász-Softmax) per class in their mean over classes.
`crossentropy+0.5*dice` or `focal(gamma=1)+lovasz` builds a weighted sum with parameters
(see parse_loss below); a loss's parameters are its keyword-only arguments.
"""
from __future__ import annotations

import inspect
import math
import os
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from segflow.utils.registry import LOSSES
from segflow.utils.runtime import log

EPSILON = 1e-6
PROBABILITY_FLOOR = 1e-7  # log(1 - p) of a saturated probability stays finite
BORDER_CUTOFF = 1e-3  # the border term is computed where it exceeds this share of w0

# Allowed ranges of the loss parameters, (low, high) inclusive, checked when the config is read.
PARAMETER_RANGES: dict[str, tuple[float, float]] = {
    "gamma": (0.0, 10.0),
    "alpha": (0.0, 1.0),
    "w0": (0.0, 1000.0),
    "sigma": (0.1, 1000.0),
}


@dataclass(frozen=True)
class LabelSpec:
    num_labels: int
    sigmoid: bool = False
    ignore_index: int | None = None
    class_weights: tuple[float, ...] | None = None  # one per label id; None weights every class 1


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


def _class_weights(spec: LabelSpec) -> tf.Tensor:
    weights = spec.class_weights if spec.class_weights is not None else (1.0,) * spec.num_labels
    return tf.constant(weights, tf.float32)


def _pixel_weights(labels: tf.Tensor, valid: tf.Tensor, spec: LabelSpec) -> tf.Tensor:
    """Each labelled pixel's weight: its true class's weight; 0 for ignored pixels."""
    if spec.class_weights is None:
        return valid
    return valid * tf.gather(_class_weights(spec), labels)


def _weighted_mean(values: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(values * weights) / tf.maximum(tf.reduce_sum(weights), EPSILON)


def _class_mean(scores: tf.Tensor, spec: LabelSpec, present: tf.Tensor | None = None) -> tf.Tensor:
    """Mean of per-class scores weighted by the class weights (and limited to `present` classes).
    A sigmoid head's region losses have only the foreground score."""
    weights = _class_weights(spec)[-scores.shape[0] :]
    if present is not None:
        weights *= tf.cast(present, tf.float32)
    return _weighted_mean(scores, weights)


def _pixel_crossentropy(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec) -> tf.Tensor:
    if spec.sigmoid:
        return tf.nn.sigmoid_cross_entropy_with_logits(tf.cast(labels, tf.float32), logits[..., 0])
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)


@LOSSES.register("crossentropy")
def crossentropy(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec) -> tf.Tensor:
    """Pixel-wise softmax (or sigmoid) cross-entropy, averaged over labelled pixels."""
    labels, valid, logits = _prepare(labels, logits, spec)
    return _weighted_mean(_pixel_crossentropy(labels, logits, spec), _pixel_weights(labels, valid, spec))


@LOSSES.register("bce")
def bce(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec) -> tf.Tensor:
    """Binary cross-entropy of every class channel against its one-hot mask (a sigmoid head's one channel)."""
    labels, valid, logits = _prepare(labels, logits, spec)
    if spec.sigmoid:
        per_pixel = _pixel_crossentropy(labels, logits, spec)
    else:
        target = tf.one_hot(labels, spec.num_labels)
        log_probs = tf.nn.log_softmax(logits, axis=-1)
        log_complement = tf.math.log(tf.maximum(1.0 - tf.exp(log_probs), PROBABILITY_FLOOR))
        per_pixel = -tf.reduce_mean(target * log_probs + (1.0 - target) * log_complement, axis=-1)
    return _weighted_mean(per_pixel, _pixel_weights(labels, valid, spec))


def _focal_terms(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec, gamma: float, alpha: float | None) -> tf.Tensor:
    """Per-pixel focal loss: (1 - p_t)^gamma x cross-entropy, times alpha on foreground and 1 - alpha on background."""
    probs = probabilities(logits, spec.sigmoid)
    true_prob = tf.reduce_sum(probs * tf.one_hot(labels, spec.num_labels), axis=-1)
    weight = tf.pow(tf.maximum(1.0 - true_prob, 0.0), gamma)
    if alpha is not None:
        weight *= tf.where(labels > 0, alpha, 1.0 - alpha)
    return weight * _pixel_crossentropy(labels, logits, spec)


@LOSSES.register("focal")
def focal(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec, *, gamma: float = 2.0, alpha: float | None = None) -> tf.Tensor:
    """Focal loss (Lin et al. 2017): down-weights pixels the model already gets right; alpha balances foreground."""
    labels, valid, logits = _prepare(labels, logits, spec)
    return _weighted_mean(_focal_terms(labels, logits, spec, gamma, alpha), _pixel_weights(labels, valid, spec))


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
    return 1.0 - _class_mean(score, spec)


@LOSSES.register("jaccard")
def jaccard(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec) -> tf.Tensor:
    """Soft Jaccard (IoU) loss, averaged over classes."""
    intersection, predicted, actual = _soft_overlap(labels, logits, spec)
    score = (intersection + EPSILON) / (predicted + actual - intersection + EPSILON)
    return 1.0 - _class_mean(score, spec)


@LOSSES.register("bce_jaccard")
def bce_jaccard(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec) -> tf.Tensor:
    """Binary cross-entropy plus soft Jaccard."""
    return bce(labels, logits, spec) + jaccard(labels, logits, spec)


@LOSSES.register("categorical_jaccard")
def categorical_jaccard(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec) -> tf.Tensor:
    """Categorical (softmax) cross-entropy plus soft Jaccard."""
    return crossentropy(labels, logits, spec) + jaccard(labels, logits, spec)


@LOSSES.register("focal_jaccard")
def focal_jaccard(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec, *, gamma: float = 2.0, alpha: float | None = None) -> tf.Tensor:
    """Focal plus soft Jaccard, both weighted per class by `class_weights` (weighted focal Jaccard)."""
    return focal(labels, logits, spec, gamma=gamma, alpha=alpha) + jaccard(labels, logits, spec)


@LOSSES.register("focal_dice")
def focal_dice(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec, *, gamma: float = 2.0, alpha: float | None = None) -> tf.Tensor:
    """Focal plus soft Dice."""
    return focal(labels, logits, spec, gamma=gamma, alpha=alpha) + dice(labels, logits, spec)


def _lovasz_gradient(truth_sorted: tf.Tensor) -> tf.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss at errors sorted in decreasing order
    (Berman et al. 2018, Alg. 1): g_i = J(first i pixels) - J(first i-1), along the last axis."""
    total = tf.reduce_sum(truth_sorted, axis=-1, keepdims=True)
    intersection = total - tf.cumsum(truth_sorted, axis=-1)
    union = total + tf.cumsum(1.0 - truth_sorted, axis=-1)
    loss = 1.0 - intersection / union  # union >= 1 from the first pixel on
    return tf.concat([loss[..., :1], loss[..., 1:] - loss[..., :-1]], axis=-1)


def _lovasz_extension(errors: tf.Tensor, truth: tf.Tensor) -> tf.Tensor:
    """The Lovász extension of the Jaccard loss of each row's set of mispredicted pixels, at
    non-negative `errors` [..., n] with ground truth `truth` [..., n] (0 or 1). The sort order
    is piecewise constant, so the gradient flows through the sorted errors only."""
    order = tf.argsort(errors, axis=-1, direction="DESCENDING", stable=True)
    errors_sorted = tf.gather(errors, order, batch_dims=errors.shape.rank - 1)
    truth_sorted = tf.gather(truth, order, batch_dims=errors.shape.rank - 1)
    return tf.reduce_sum(errors_sorted * tf.stop_gradient(_lovasz_gradient(truth_sorted)), axis=-1)


@LOSSES.register("lovasz_hinge")
def lovasz_hinge(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec) -> tf.Tensor:
    """Lovász hinge (Berman et al. 2018): a convex surrogate of the foreground IoU of a binary mask.

    A two-class softmax scores foreground by its logit difference. With more classes, the mean over
    the classes present of each class's hinge on its margin over the best other logit. Class weights
    scale each pixel's hinge error by its true class's weight."""
    labels, valid, logits = _prepare(labels, logits, spec)
    keep = valid > 0
    kept_labels, kept_logits = tf.boolean_mask(labels, keep), tf.boolean_mask(logits, keep)  # [n], [n, C]
    if spec.num_labels == 2:
        scores = kept_logits[:, 0] if spec.sigmoid else kept_logits[:, 1] - kept_logits[:, 0]
        scores, truth = scores[None], tf.cast(kept_labels == 1, tf.float32)[None]
    else:
        best = tf.math.top_k(kept_logits, 2).values
        best_other = tf.where(kept_logits >= best[:, :1], best[:, 1:], best[:, :1])
        scores, truth = tf.transpose(kept_logits - best_other), tf.transpose(tf.one_hot(kept_labels, spec.num_labels))
    errors = tf.nn.relu(1.0 - scores * (2.0 * truth - 1.0)) * tf.boolean_mask(_pixel_weights(labels, valid, spec), keep)
    per_class = _lovasz_extension(errors, truth)  # [classes scored]
    if spec.num_labels == 2:
        return per_class[0]
    return _weighted_mean(per_class, tf.cast(tf.reduce_sum(truth, axis=-1) > 0, tf.float32))


@LOSSES.register("lovasz_softmax")
def lovasz_softmax(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec) -> tf.Tensor:
    """Lovász-Softmax (Berman et al. 2018): per class present, the Lovász extension of its Jaccard loss.

    The errors are |1[y = c] - p_c|; the mean is over the classes present in the labels."""
    labels, valid, logits = _prepare(labels, logits, spec)
    keep = valid > 0
    probs = tf.boolean_mask(probabilities(logits, spec.sigmoid), keep)  # [n, K]
    truth = tf.one_hot(tf.boolean_mask(labels, keep), spec.num_labels)
    errors = tf.transpose(tf.abs(truth - probs))  # [K, n]: one Lovász extension per class
    per_class = _lovasz_extension(errors, tf.transpose(truth))
    present = tf.reduce_sum(truth, axis=0) > 0
    weights = _class_weights(spec) * tf.cast(present, tf.float32)
    return _weighted_mean(per_class, weights)


@LOSSES.register("lovasz")
def lovasz(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec) -> tf.Tensor:
    """Lovász loss: the hinge for a sigmoid head, Lovász-Softmax for a softmax head."""
    return lovasz_hinge(labels, logits, spec) if spec.sigmoid else lovasz_softmax(labels, logits, spec)


def border_weights(labels: np.ndarray, num_labels: int, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """U-Net border term (Ronneberger et al. 2015, eq. 2) per pixel, [B,H,W] float32:
    w0 * exp(-(d1 + d2)^2 / (2 sigma^2)), d1 and d2 the distances to the nearest and second
    nearest object. Objects are the 8-connected components of each class other than 0 (the
    background). Each object's Euclidean distance transform (scipy.ndimage) is computed in its
    bounding box grown by the distance beyond which the term is below BORDER_CUTOFF x w0, which
    keeps hundreds of cells per image cheap; beyond that the term is taken as 0."""
    from scipy import ndimage

    reach = int(math.ceil(sigma * math.sqrt(2.0 * math.log(1.0 / BORDER_CUTOFF))))
    out = np.zeros(labels.shape, np.float32)
    for image_index, image in enumerate(np.asarray(labels)):
        height, width = image.shape
        nearest = np.full((2, height, width), np.inf)
        for label in range(1, num_labels):
            components, _ = ndimage.label(image == label, structure=np.ones((3, 3)))
            for index, box in enumerate(ndimage.find_objects(components), start=1):
                if box is None:
                    continue
                rows = slice(max(box[0].start - reach, 0), min(box[0].stop + reach, height))
                columns = slice(max(box[1].start - reach, 0), min(box[1].stop + reach, width))
                distance = ndimage.distance_transform_edt(components[rows, columns] != index)
                first, second = nearest[0, rows, columns], nearest[1, rows, columns]
                nearest[1, rows, columns] = np.minimum(second, np.maximum(first, distance))
                nearest[0, rows, columns] = np.minimum(first, distance)
        out[image_index] = w0 * np.exp(-np.square(nearest[0] + nearest[1]) / (2.0 * sigma**2))
    return out


@LOSSES.register("distance_focal")
def distance_focal(
    labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec, *, gamma: float = 2.0, alpha: float | None = None, w0: float = 10.0, sigma: float = 5.0
) -> tf.Tensor:
    """Focal loss with U-Net border weights: w = w_c + w0 exp(-(d1+d2)^2 / 2 sigma^2) separates touching objects.

    sigma and the distances are in pixels. The weight map comes from the labels inside the loss
    (`border_weights` via tf.numpy_function: training only, never in a served graph)."""
    labels, valid, logits = _prepare(labels, logits, spec)
    border = tf.numpy_function(lambda array: border_weights(array, spec.num_labels, w0, sigma), [labels], tf.float32, stateful=False)
    border = tf.ensure_shape(border, labels.shape)
    weights = _pixel_weights(labels, valid, spec) + border * valid
    return _weighted_mean(_focal_terms(labels, logits, spec, gamma, alpha), weights)


@LOSSES.register("mse")
def mse(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec) -> tf.Tensor:
    """Mean squared error between the class probabilities and the one-hot labels."""
    labels, valid, logits = _prepare(labels, logits, spec)
    errors = tf.square(probabilities(logits, spec.sigmoid) - tf.one_hot(labels, spec.num_labels))
    return _weighted_mean(tf.reduce_mean(errors, axis=-1), _pixel_weights(labels, valid, spec))


@LOSSES.register("mae")
def mae(labels: tf.Tensor, logits: tf.Tensor, spec: LabelSpec) -> tf.Tensor:
    """Mean absolute error between the class probabilities and the one-hot labels."""
    labels, valid, logits = _prepare(labels, logits, spec)
    errors = tf.abs(probabilities(logits, spec.sigmoid) - tf.one_hot(labels, spec.num_labels))
    return _weighted_mean(tf.reduce_mean(errors, axis=-1), _pixel_weights(labels, valid, spec))


LOSSES.add("ce", crossentropy)
LOSSES.add("categorical_crossentropy", crossentropy)
LOSSES.add("sparse_categorical_crossentropy", crossentropy)
LOSSES.add("binary_crossentropy", bce)
LOSSES.add("iou", jaccard)


def loss_parameters(name: str) -> dict[str, float | None]:
    """A registered loss's parameters (its keyword-only arguments) and their defaults."""
    signature = inspect.signature(LOSSES.get(name))
    return {key: value.default for key, value in signature.parameters.items() if value.kind is inspect.Parameter.KEYWORD_ONLY}


def check_parameters(name: str, params: dict[str, float]) -> None:
    """Fail on a parameter `name` does not take, or a value outside PARAMETER_RANGES."""
    known = loss_parameters(name)
    for key, value in params.items():
        if key not in known:
            takes = f"takes {', '.join(sorted(known))}" if known else "takes no parameters"
            raise ValueError(f"loss {name!r} has no parameter {key!r}; it {takes}")
        low, high = PARAMETER_RANGES[key]
        if not low <= value <= high:
            raise ValueError(f"loss {name!r}: {key}={value:g} is outside {low:g}..{high:g}")


def build_loss(expression: str, spec: LabelSpec) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """A Keras loss function for a weighted sum such as `crossentropy+0.5*dice` or `bce+lovasz_hinge`."""

    terms = [(term.weight, LOSSES.get(term.name), term.params) for term in parse_loss(expression)]

    def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return tf.add_n([weight * fn(y_true, y_pred, spec, **params) for weight, fn, params in terms])

    loss.__name__ = "segmentation_loss"
    return loss


def median_frequency_weights(class_pixels: Sequence[int], image_pixels: Sequence[int]) -> tuple[float, ...]:
    """Median-frequency balancing (Eigen & Fergus 2015): freq(c) = pixels of class c / labelled
    pixels of the images where c is present; weight(c) = median(freq) / freq(c). A class absent
    from the data keeps weight 1."""
    class_pixels = np.asarray(class_pixels, np.float64)
    image_pixels = np.asarray(image_pixels, np.float64)
    present = class_pixels > 0
    if not present.any():
        return (1.0,) * len(class_pixels)
    frequency = np.where(present, class_pixels / np.maximum(image_pixels, 1.0), np.nan)
    median = np.nanmedian(frequency)
    return tuple(float(median / value) if ok else 1.0 for value, ok in zip(frequency, present))


def train_class_pixels(examples_dir: str | os.PathLike[str], num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels of each class, labelled pixels of the images containing it) over the train
    split's masks; values outside 0..num_labels-1 (ignore_index) are not counted."""
    from segflow.data.examples import split_files
    from segflow.utils.io import decode_image

    class_pixels = np.zeros(num_labels, np.int64)
    image_pixels = np.zeros(num_labels, np.int64)
    for record in tf.data.TFRecordDataset(split_files(examples_dir, "train"), compression_type="GZIP"):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        mask = decode_image(feature["mask"].bytes_list.value[0], feature["filename"].bytes_list.value[0].decode())[..., 0]
        counts = np.bincount(mask[mask < num_labels].reshape(-1), minlength=num_labels)
        class_pixels += counts
        image_pixels += np.where(counts > 0, counts.sum(), 0)
    return class_pixels, image_pixels


def resolve_class_weights(setting: str | list[float] | None, examples_dir: str | os.PathLike[str], class_names: list[str]) -> tuple[float, ...] | None:
    """The config's `class_weights` as one weight per label: a list as given, `auto` as
    median-frequency weights of the train split (counted from the Examples the trainer reads)."""
    if setting is None:
        return None
    if setting != "auto":
        return tuple(float(value) for value in setting)
    weights = median_frequency_weights(*train_class_pixels(examples_dir, len(class_names)))
    log("trainer: class_weights auto (median frequency, train split): " + ", ".join(f"{n} {w:.3f}" for n, w in zip(class_names, weights)))
    return weights


NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"


LOSS_TERM = re.compile(rf"^\s*(?:(?P<weight>{NUMBER})\s*\*\s*)?(?P<name>[a-z][a-z0-9_]*)\s*(?:\((?P<params>[^()]*)\))?\s*$")


LOSS_PARAMETER = re.compile(rf"^\s*(?P<key>[a-z][a-z0-9_]*)\s*=\s*(?P<value>{NUMBER})\s*$")


class LossTerm(NamedTuple):
    """One term of a loss expression: `0.5*focal(gamma=1)` is (0.5, 'focal', {'gamma': 1.0})."""

    weight: float
    name: str
    params: dict[str, float]


def _split_terms(expression: str) -> list[str]:
    """Split at the `+` signs outside parentheses."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(expression):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "+" and depth == 0:
            parts.append(expression[start:index])
            start = index + 1
    return [*parts, expression[start:]]


def parse_loss(expression: str) -> list[LossTerm]:
    """Parse `crossentropy+0.5*dice` or `0.5*focal(gamma=1, alpha=0.25)+lovasz` into terms: a
    weighted sum of registered losses, each with its own keyword parameters (numbers)."""

    terms = []
    for part in _split_terms(expression):
        match = LOSS_TERM.match(part)
        if not match:
            raise ValueError(
                f"cannot parse loss term {part.strip()!r} in {expression!r}; expected e.g. 'crossentropy+0.5*dice' or 'focal(gamma=2)+dice'"
            )
        name = match.group("name")
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; registered: {', '.join(LOSSES.names())}")
        params: dict[str, float] = {}
        for assignment in filter(str.strip, (match.group("params") or "").split(",")):
            parameter = LOSS_PARAMETER.match(assignment)
            if not parameter:
                raise ValueError(f"cannot parse parameter {assignment.strip()!r} of loss {name!r}; expected e.g. {name}(gamma=2)")
            if parameter.group("key") in params:
                raise ValueError(f"parameter {parameter.group('key')!r} of loss {name!r} is given twice")
            params[parameter.group("key")] = float(parameter.group("value"))
        check_parameters(name, params)
        terms.append(LossTerm(float(match.group("weight") or 1.0), name, params))
    return terms
