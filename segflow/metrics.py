"""Streaming confusion matrix and the per-class metrics derived from it.

One matrix accumulated over the whole eval split gives dataset-level IoU, the
number the segmentation literature reports (not an average of per-image IoUs).
"""
from __future__ import annotations

import numpy as np


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
