"""Evaluate any mask predictor on a split: the evaluator and every export use this."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from segflow.console import progress
from segflow.data.examples import SegmentationExample, iter_split
from segflow.export.serving import MaskPredictor, ServingSpec
from segflow.model.metrics import ConfusionMatrix
from segflow.utils.io import read_json


def evaluate(
    predict: MaskPredictor,
    examples_dir: str | os.PathLike[str],
    split: str,
    spec: ServingSpec,
    reference: dict[str, np.ndarray] | None = None,
    step: str | None = None,
) -> dict[str, Any]:
    """Dataset-level metrics at each image's original resolution (masks are never resized).
    With `reference` (file name -> mask of the served model), also the share of pixels on
    which this predictor agrees with it: how much an export changes what users get.
    `step`: the console's progress label (segflow.console), else no progress."""
    matrix = ConfusionMatrix(len(spec.class_names), spec.ignore_index)
    count = agreeing = compared = 0
    for example in _examples(examples_dir, split, step):
        mask = predict(example.image)
        matrix.update(example.mask, mask)
        count += 1
        if reference is not None:
            agreeing += int((reference[example.filename] == mask).sum())
            compared += mask.size
    report = matrix.report(list(spec.class_names))
    report["examples"] = count
    if reference is not None:
        report["agreement"] = agreeing / max(compared, 1)
    return report


def predict_split(predict: MaskPredictor, examples_dir: str | os.PathLike[str], split: str, step: str | None = None) -> dict[str, np.ndarray]:
    """File name -> predicted mask for every example of a split (the reference for exports)."""
    return {example.filename: predict(example.image) for example in _examples(examples_dir, split, step)}


def _examples(examples_dir: str | os.PathLike[str], split: str, step: str | None) -> Iterator[SegmentationExample]:
    """The split's examples, counted into the console step `step` (its size from ExampleGen's counts)."""
    if step is None:
        return iter_split(examples_dir, split)
    from segflow.data.examples import read_counts

    return progress(iter_split(examples_dir, split), step, total=read_counts(examples_dir)[f"{split}_examples"], unit="images")


METRICS_FILE = "metrics.json"


SLICES_FILE = "slices.json"


BLESSED, NOT_BLESSED = "BLESSED", "NOT_BLESSED"


def read_blessing(blessing_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """blessing.json; None for a blessing written before it existed."""
    path = Path(blessing_dir) / BLESSING_FILE
    return read_json(path) if path.exists() else None


BLESSING_FILE = "blessing.json"


def is_blessed(blessing_dir: str | os.PathLike[str]) -> bool:
    return (Path(blessing_dir) / BLESSED).exists()
