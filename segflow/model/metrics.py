"""Streaming confusion matrix and the per-class metrics derived from it.

One matrix accumulated over the whole eval split gives dataset-level IoU, the
number the segmentation literature reports (not an average of per-image IoUs).
`ConfusionMatrix` is the evaluator's (numpy, per batch of predictions);
`SegmentationMetrics` is the trainer's Keras metric: the same matrix in a variable,
so every epoch's history and TensorBoard get the per-class numbers too.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras


class ConfusionMatrix:
    """Rows are true labels, columns predictions; pixels labelled `ignore_index` are skipped."""

    def __init__(self, num_labels: int, ignore_index: int | None = None) -> None:
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_labels, num_labels), np.int64)

    def update(self, labels: np.ndarray, predictions: np.ndarray) -> None:
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
        predictions = np.asarray(predictions).reshape(-1).astype(np.int64)
        if labels.shape != predictions.shape:
            raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in size")
        keep = (labels >= 0) & (labels < self.num_labels)
        if self.ignore_index is not None:
            keep &= labels != self.ignore_index
        index = labels[keep] * self.num_labels + np.clip(predictions[keep], 0, self.num_labels - 1)
        self.matrix += np.bincount(index, minlength=self.num_labels**2).reshape(self.num_labels, self.num_labels)

    def report(self, class_names: list[str] | None = None) -> dict:
        return matrix_report(self.matrix, class_names)


def matrix_report(matrix: np.ndarray, class_names: list[str] | None = None) -> dict[str, Any]:
    """Every metric a confusion matrix (rows true, columns predicted) determines. mean IoU is over
    classes present in labels or predictions; absent classes get NaN (null in JSON). Dice is the
    pixel F1. Frequency-weighted IoU weighs each class's IoU by its share of labelled pixels."""
    num_labels = matrix.shape[0]
    names = class_names or [str(index) for index in range(num_labels)]
    true_positive = np.diag(matrix).astype(np.float64)
    actual = matrix.sum(axis=1).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    union = actual + predicted - true_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
        precision = np.where(predicted > 0, true_positive / predicted, np.nan)
        recall = np.where(actual > 0, true_positive / actual, np.nan)
        dice = np.where(actual + predicted > 0, 2.0 * true_positive / (actual + predicted), np.nan)
    total = matrix.sum()
    return {
        "mean_iou": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
        "frequency_weighted_iou": float(np.nansum(actual * iou) / total) if total else float("nan"),
        "pixel_accuracy": float(true_positive.sum() / total) if total else float("nan"),
        "per_class_iou": dict(zip(names, iou.tolist())),
        "per_class_precision": dict(zip(names, precision.tolist())),
        "per_class_recall": dict(zip(names, recall.tolist())),
        "per_class_dice": dict(zip(names, dice.tolist())),
        "pixels": int(total),
        "confusion_matrix": np.asarray(matrix).tolist(),
    }


# 4-connectivity: a pixel is on a region's boundary when one of its 4 neighbours is outside it.
_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8)


def _boundary(region: np.ndarray, neutral: np.ndarray | None = None) -> np.ndarray:
    """Pixels of `region` with a 4-neighbour outside it; the image edge and `neutral` pixels
    (ignore_index) count as inside, so neither makes a boundary."""
    import cv2

    inside = region if neutral is None else region | neutral
    return region & (cv2.erode(inside.astype(np.uint8), _CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=1) == 0)


def _within(pixels: np.ndarray, tolerance: float) -> np.ndarray:
    """Pixels at most `tolerance` (Euclidean) from a True pixel of `pixels`: a dilation by the
    disk of that radius, exact and much faster than a distance transform per class."""
    import cv2

    offsets = np.arange(-int(tolerance), int(tolerance) + 1)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= tolerance**2).astype(np.uint8)
    return cv2.dilate(pixels.astype(np.uint8), disk, borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0


def boundary_counts(labels: np.ndarray, predictions: np.ndarray, num_labels: int, tolerance: float, ignore_index: int | None = None) -> np.ndarray:
    """Per class [matched predicted, predicted, matched true, true] boundary pixels ([num_labels, 4]):
    a boundary pixel matches when one of the other mask's is within `tolerance` pixels (Euclidean),
    the boundary F1 of Csurka et al. (BMVC 2013). Sums over images give the dataset's figures.
    ignore_index pixels are excluded: no true boundary runs along them, predicted boundary
    pixels on them are not counted (they still match true ones, since the true edge is unknown there)."""
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    ignored = labels == ignore_index if ignore_index is not None else np.zeros(labels.shape, bool)
    present = np.union1d(np.unique(labels[~ignored]), np.unique(predictions))
    counts = np.zeros((num_labels, 4), np.int64)
    for index in present[present < num_labels]:  # an absent class has no boundary
        truth = _boundary(labels == index, ignored)
        predicted = _boundary(predictions == index)
        counted = predicted & ~ignored
        counts[index] = [(counted & _within(truth, tolerance)).sum(), counted.sum(), (truth & _within(predicted, tolerance)).sum(), truth.sum()]
    return counts


def boundary_report(counts: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Boundary precision, recall and F1 per class from summed `boundary_counts`; boundary_f1 is
    their mean over classes with a boundary in truth or prediction (NaN where neither has one)."""
    matched_predicted, predicted, matched_true, true = counts.astype(np.float64).T
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, matched_predicted / predicted, np.where(true > 0, 0.0, np.nan))
        recall = np.where(true > 0, matched_true / true, np.where(predicted > 0, 0.0, np.nan))
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), np.where(np.isnan(precision), np.nan, 0.0))
    present = (predicted + true) > 0
    return {
        "boundary_f1": float(np.nanmean(f1[present])) if present.any() else float("nan"),
        "per_class_boundary_f1": dict(zip(class_names, f1.tolist())),
        "per_class_boundary_precision": dict(zip(class_names, precision.tolist())),
        "per_class_boundary_recall": dict(zip(class_names, recall.tolist())),
    }


def metric_key(prefix: str, class_name: str) -> str:
    """`per_class_iou_<class>`: a history CSV column and TensorBoard tag (characters outside
    [A-Za-z0-9_.-] become _). CSVLogger sorts its columns: the prefix keeps `epoch, loss, mean_iou` first."""
    return f"per_class_{prefix}_{re.sub(r'[^A-Za-z0-9_.-]', '_', class_name)}"


class SegmentationMetrics(keras.metrics.Metric):
    """Confusion matrix accumulated over an epoch; `result()` is a dict (Keras logs each key):
    mean_iou (over classes in labels or predictions), pixel_accuracy, and each class's IoU, precision,
    recall and Dice (`metric_key`: per_class_iou_<class>; NaN where undefined). Labels outside
    0..num_labels-1 (ignore_index) are skipped.
    The matrix is a SUM-aggregated, on-read variable, so MirroredStrategy and
    MultiWorkerMirroredStrategy add the replicas' matrices before any ratio is taken."""

    def __init__(self, num_labels: int, sigmoid: bool, class_names: list[str], name: str = "segmentation", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        if len(class_names) != num_labels:
            raise ValueError(f"{len(class_names)} class names for {num_labels} labels")
        self.num_labels = num_labels
        self.sigmoid = sigmoid
        self.class_names = list(class_names)
        self.matrix = self.add_weight(
            "confusion", shape=(num_labels, num_labels), initializer="zeros", dtype=tf.float64, aggregation=tf.VariableAggregation.SUM
        )

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: tf.Tensor | None = None) -> None:
        labels = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        if self.sigmoid:
            logits = y_pred[..., 0] if y_pred.shape.rank == 4 else y_pred
            predictions = tf.cast(logits > 0.0, tf.int32)
        else:
            predictions = tf.argmax(y_pred, axis=-1, output_type=tf.int32)
        predictions = tf.reshape(predictions, [-1])
        keep = (labels >= 0) & (labels < self.num_labels)
        matrix = tf.math.confusion_matrix(
            tf.boolean_mask(labels, keep), tf.boolean_mask(predictions, keep), num_classes=self.num_labels, dtype=tf.float64
        )
        self.matrix.assign_add(matrix)

    def result(self) -> dict[str, tf.Tensor]:
        matrix = tf.convert_to_tensor(self.matrix)
        true_positive = tf.linalg.diag_part(matrix)
        actual = tf.reduce_sum(matrix, axis=1)
        predicted = tf.reduce_sum(matrix, axis=0)
        union = actual + predicted - true_positive
        nan = tf.constant(np.nan, tf.float64)

        def ratio(numerator: tf.Tensor, denominator: tf.Tensor) -> tf.Tensor:
            return tf.where(denominator > 0, tf.math.divide_no_nan(numerator, denominator), nan)

        iou = ratio(true_positive, union)
        present = union > 0
        results = {
            "mean_iou": tf.reduce_mean(tf.boolean_mask(iou, present)),
            "pixel_accuracy": ratio(tf.reduce_sum(true_positive), tf.reduce_sum(matrix)),
        }
        per_class = {
            "iou": iou,
            "precision": ratio(true_positive, predicted),
            "recall": ratio(true_positive, actual),
            "dice": ratio(2.0 * true_positive, actual + predicted),
        }
        for prefix, values in per_class.items():
            for index, class_name in enumerate(self.class_names):
                results[metric_key(prefix, class_name)] = values[index]
        return results

    def reset_state(self) -> None:
        self.matrix.assign(tf.zeros_like(self.matrix))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_labels": self.num_labels, "sigmoid": self.sigmoid, "class_names": self.class_names}


def probability_histograms(labels: np.ndarray, foreground: np.ndarray, steps: int, ignore_index: int | None = None) -> np.ndarray:
    """[2, steps] counts of labelled pixels by foreground-probability bin (bin k holds
    k/steps <= p < (k+1)/steps): row 0 background, row 1 foreground pixels. Summed over images,
    they give the confusion matrix at every threshold k/steps without a second pass."""
    labels = np.asarray(labels).reshape(-1)
    bins = np.clip((np.asarray(foreground, np.float64).reshape(-1) * steps).astype(np.int64), 0, steps - 1)
    keep = labels < 2
    if ignore_index is not None:
        keep &= labels != ignore_index
    return np.bincount(labels[keep] * steps + bins[keep], minlength=2 * steps).reshape(2, steps)


def threshold_sweep(histograms: np.ndarray) -> dict[str, Any]:
    """Foreground IoU and mean IoU at each threshold k/steps (foreground when p >= threshold),
    and the threshold with the best mean IoU (the lowest on ties)."""
    steps = histograms.shape[1]
    negatives, positives = histograms.astype(np.float64)
    # Pixels at or above threshold k/steps: the suffix sums from bin k.
    false_positive = np.cumsum(negatives[::-1])[::-1][1:]
    true_positive = np.cumsum(positives[::-1])[::-1][1:]
    false_negative = positives.sum() - true_positive
    true_negative = negatives.sum() - false_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        foreground = true_positive / (true_positive + false_positive + false_negative)
        background = true_negative / (true_negative + false_negative + false_positive)
    mean = np.nanmean(np.stack([foreground, background]), axis=0) if histograms.sum() else np.full(steps - 1, np.nan)
    thresholds = np.arange(1, steps) / steps
    best = int(np.nanargmax(mean)) if np.isfinite(mean).any() else None
    return {
        "thresholds": thresholds.tolist(),
        "foreground_iou": foreground.tolist(),
        "mean_iou": mean.tolist(),
        "best_threshold": float(thresholds[best]) if best is not None else None,
        "best_mean_iou": float(mean[best]) if best is not None else None,
    }
