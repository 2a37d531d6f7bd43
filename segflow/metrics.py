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
        """mean IoU over classes present in labels or predictions; absent classes get NaN (null in JSON)."""
        names = class_names or [str(index) for index in range(self.num_labels)]
        true_positive = np.diag(self.matrix).astype(np.float64)
        actual = self.matrix.sum(axis=1).astype(np.float64)
        predicted = self.matrix.sum(axis=0).astype(np.float64)
        union = actual + predicted - true_positive
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, true_positive / union, np.nan)
            precision = np.where(predicted > 0, true_positive / predicted, np.nan)
            recall = np.where(actual > 0, true_positive / actual, np.nan)
        total = self.matrix.sum()
        return {
            "mean_iou": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
            "pixel_accuracy": float(true_positive.sum() / total) if total else float("nan"),
            "per_class_iou": dict(zip(names, iou.tolist())),
            "per_class_precision": dict(zip(names, precision.tolist())),
            "per_class_recall": dict(zip(names, recall.tolist())),
            "pixels": int(total),
            "confusion_matrix": self.matrix.tolist(),
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
