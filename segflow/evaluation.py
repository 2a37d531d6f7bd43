"""Evaluate any model-size predictor on a split: the evaluator and every export use this."""
from __future__ import annotations

import os
from typing import Any

from segflow.examples import iter_split
from segflow.metrics import ConfusionMatrix
from segflow.serving import FixedSizePredictor, ServingSpec, predict_image


def evaluate(predict: FixedSizePredictor, examples_dir: str | os.PathLike[str], split: str, spec: ServingSpec) -> dict[str, Any]:
    """Dataset-level metrics at each image's original resolution (masks are never resized)."""
    matrix = ConfusionMatrix(len(spec.class_names), spec.ignore_index)
    count = 0
    for example in iter_split(examples_dir, split):
        matrix.update(example.mask, predict_image(predict, example.image, example.bit_depth, spec.shape))
        count += 1
    report = matrix.report(list(spec.class_names))
    report["examples"] = count
    return report
