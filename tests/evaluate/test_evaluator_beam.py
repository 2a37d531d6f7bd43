"""The Beam evaluator against direct numpy computations on small synthetic examples: metrics
overall and per slice (ignore_index included), boundary F1 on a hand-made mask, the binary
threshold sweep, and the evaluator core end to end on a tiny SavedModel with TFMA's outputs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from segflow.evaluate.beam_evaluation import BatchPredictor, EvalSettings, default_slicing_specs, eval_config, run_pipeline
from segflow.config.experiment import EvaluationConfig
from segflow.utils.beam_runners import pipeline_options
from segflow.data.examples import SegmentationExample, serialize, shard_name, split_dir, write_shard
from segflow.model.metrics import boundary_counts, boundary_report
from segflow.evaluate.evaluation import is_blessed

IGNORE = 255
CLASSES = ("background", "cell", "membrane")


class ChannelScores:
    """A picklable stand-in model: class k's score is channel k of the image plus one, so the
    predicted class is the brightest channel (the test decides every prediction)."""

    def __call__(self) -> BatchPredictor:
        def predict(images: np.ndarray) -> np.ndarray:
            scores = images[..., :3].astype(np.float64) + 1.0
            return scores / scores.sum(axis=-1, keepdims=True)

        return predict


class ForegroundFromRed:
    """Binary stand-in: the foreground probability is the red value / 200."""

    def __call__(self) -> BatchPredictor:
        def predict(images: np.ndarray) -> np.ndarray:
            foreground = images[..., 0].astype(np.float64) / 200.0
            return np.stack([1.0 - foreground, foreground], axis=-1)

        return predict


def with_column(record: bytes, name: str, value: str) -> bytes:
    """A serialized example with one more bytes feature (a dataset's metadata column)."""
    example = tf.train.Example.FromString(record)
    example.features.feature[name].bytes_list.value.append(value.encode())
    return example.SerializeToString(deterministic=True)


def write_split(examples_dir: Path, split: str, examples: list[tuple[SegmentationExample, str]]) -> None:
    write_shard(split_dir(examples_dir, split) / shard_name(0, 1), [with_column(serialize(example), "scanner", scanner) for example, scanner in examples])


def synthetic(rng: np.random.Generator, name: str, height: int, width: int, empty: bool) -> SegmentationExample:
    """Random predictions (distinct channel values, so argmax has no ties) and a mask with
    ignore_index pixels; `empty`: background and ignore only."""
    image = np.stack([rng.permutation(3) * 60 + rng.integers(0, 50) for _ in range(height * width)]).reshape(height, width, 3).astype(np.uint8)
    mask = rng.integers(0, 3, (height, width)).astype(np.uint8)
    mask[rng.random((height, width)) < 0.1] = IGNORE
    if empty:
        mask[mask < 3] = 0
    return SegmentationExample(filename=name, image=image, mask=mask)


def settings(**overrides: Any) -> EvalSettings:
    values: dict[str, Any] = {
        "class_names": CLASSES, "ignore_index": IGNORE, "boundary_tolerance": 2.0, "threshold_steps": 0,
        "image_size_buckets": (256, 512), "object_size_buckets": (0.5,), "group_by": r"^([a-z]+)_", "tta": "none",
    }
    return EvalSettings(**{**values, **overrides})


def options(tmp_path: Path) -> Any:
    return pipeline_options("multi_threading", 2, tmp_path / "beam")


# --- direct numpy references -------------------------------------------------------------


def reference_matrix(examples: list[SegmentationExample], predictions: list[np.ndarray]) -> np.ndarray:
    matrix = np.zeros((3, 3), np.int64)
    for example, prediction in zip(examples, predictions):
        for true, predicted in zip(example.mask.ravel(), prediction.ravel()):
            if true != IGNORE:
                matrix[true, predicted] += 1
    return matrix


def reference_metrics(matrix: np.ndarray) -> dict[str, Any]:
    iou, precision, recall, dice = [], [], [], []
    for k in range(3):
        tp, fp, fn = matrix[k, k], matrix[:, k].sum() - matrix[k, k], matrix[k].sum() - matrix[k, k]
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else np.nan)
        precision.append(tp / (tp + fp) if tp + fp else np.nan)
        recall.append(tp / (tp + fn) if tp + fn else np.nan)
        dice.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else np.nan)
    weights = matrix.sum(axis=1) / matrix.sum()
    return {
        "mean_iou": np.nanmean(iou),
        "pixel_accuracy": np.trace(matrix) / matrix.sum(),
        "frequency_weighted_iou": sum(w * i for w, i in zip(weights, iou) if w > 0),
        "per_class_iou": iou,
        "per_class_precision": precision,
        "per_class_recall": recall,
        "per_class_dice": dice,
    }


def reference_boundary(region: np.ndarray, neutral: np.ndarray) -> set[tuple[int, int]]:
    """Pixels of `region` with a 4-neighbour inside the image that is neither in it nor neutral."""
    height, width = region.shape
    found = set()
    for row, column in zip(*np.nonzero(region)):
        for r, c in ((row - 1, column), (row + 1, column), (row, column - 1), (row, column + 1)):
            if 0 <= r < height and 0 <= c < width and not region[r, c] and not neutral[r, c]:
                found.add((int(row), int(column)))
    return found


def reference_boundary_counts(mask: np.ndarray, prediction: np.ndarray, tolerance: float) -> np.ndarray:
    ignored = mask == IGNORE
    counts = np.zeros((3, 4), np.int64)
    for k in range(3):
        truth = reference_boundary(mask == k, ignored)
        predicted = reference_boundary(prediction == k, np.zeros_like(ignored))

        def near(pixel: tuple[int, int], others: set[tuple[int, int]]) -> bool:
            return any((pixel[0] - r) ** 2 + (pixel[1] - c) ** 2 <= tolerance**2 for r, c in others)

        counted = {pixel for pixel in predicted if not ignored[pixel]}
        counts[k] = [sum(near(p, truth) for p in counted), len(counted), sum(near(p, predicted) for p in truth), len(truth)]
    return counts


def close(actual: Any, expected: Any) -> bool:
    actual = np.array([np.nan if value is None else value for value in np.atleast_1d(actual)], np.float64)
    return bool(np.allclose(actual, np.atleast_1d(np.asarray(expected, np.float64)), equal_nan=True))


# --- tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Eval and test splits of varied sizes, groups, empty masks and a metadata column, through
    the Beam pipeline once."""
    root = tmp_path_factory.mktemp("beam-eval")
    rng = np.random.default_rng(0)
    layout = [("alpha_1.png", 12, 16, False, "x"), ("alpha_2.png", 20, 9, True, "y"), ("beta_1.png", 300, 6, False, "x"),
              ("beta_2.png", 12, 16, False, "y"), ("gamma_1.png", 7, 600, False, "x"), ("gamma_2.png", 12, 16, True, "x")]
    examples = [(synthetic(rng, name, h, w, empty), scanner) for name, h, w, empty, scanner in layout]
    write_split(root / "examples", "eval", examples)
    write_split(root / "examples", "test", examples[:2])
    config = settings()
    specs = default_slicing_specs(root / "examples", "eval", config)
    specs.append({"feature_keys": ["scanner"], "feature_values": {"mask_empty": "non-empty"}})
    out = root / "out"
    splits = {"eval": eval_config(specs, CLASSES, 0), "test": eval_config([{}], CLASSES, 0)}
    slices = run_pipeline(ChannelScores(), root / "examples", splits, config, 4, options(root), out)
    return {"examples": examples, "specs": specs, "slices": slices, "out": out}


def test_default_slicing_specs_cover_derived_features_and_metadata_columns(evaluated: dict) -> None:
    keys = [spec.get("feature_keys") for spec in evaluated["specs"]]
    assert keys[:7] == [None, ["source"], ["image_size"], ["object_size"], ["mask_empty"], ["bit_depth"], ["channels"]]
    assert ["scanner"] in keys and ["height"] not in keys


def test_metrics_overall_and_per_slice_equal_numpy(evaluated: dict) -> None:
    examples = [example for example, _ in evaluated["examples"]]
    scanners = {example.filename: scanner for example, scanner in evaluated["examples"]}
    predict = ChannelScores()()
    predictions = {example.filename: predict(example.image[None])[0].argmax(axis=-1) for example in examples}

    def features(example: SegmentationExample) -> dict[str, Any]:
        labelled = example.mask != IGNORE
        share = (labelled & (example.mask > 0)).sum() / labelled.sum()
        side = max(example.mask.shape)
        return {
            "source": example.filename.split("_")[0],
            "image_size": "<=256px" if side <= 256 else "256-512px" if side <= 512 else ">512px",
            "object_size": "none" if share == 0 else "<=0.5" if share <= 0.5 else ">0.5",
            "mask_empty": "empty" if share == 0 else "non-empty",
            "scanner": scanners[example.filename],
            "channels": 3,
            "bit_depth": 8,
        }

    entries = evaluated["slices"]["eval"]
    assert len({entry["slice"] for entry in entries}) == len(entries)
    checked = 0
    for entry in entries:
        members = [e for e in examples if all(str(features(e)[name]) == str(value) for name, value in entry["slice_key"].items())]
        assert entry["metrics"]["examples"] == len(members), entry["slice"]
        expected = reference_metrics(reference_matrix(members, [predictions[e.filename] for e in members]))
        for name, value in expected.items():
            got = entry["metrics"][name]
            assert close(list(got.values()) if isinstance(got, dict) else got, value), (entry["slice"], name)
        boundary = sum(reference_boundary_counts(e.mask, predictions[e.filename], 2.0) for e in members)
        assert close(list(entry["metrics"]["per_class_boundary_f1"].values()), list(boundary_report(boundary, list(CLASSES))["per_class_boundary_f1"].values()))
        checked += 1
    names = {entry["slice"] for entry in entries}
    assert {"Overall", "source:alpha", "image_size:256-512px", "image_size:>512px", "mask_empty:empty", "scanner:x"} <= names
    assert "mask_empty_X_scanner:non-empty_X_y" in names and checked == len(entries)
    test_overall = evaluated["slices"]["test"][0]["metrics"]
    assert close(test_overall["mean_iou"], reference_metrics(reference_matrix(examples[:2], [predictions[e.filename] for e in examples[:2]]))["mean_iou"])


def test_tfma_metrics_and_per_image_files(evaluated: dict) -> None:
    import tensorflow_model_analysis as tfma

    records = list(tfma.load_metrics(str(evaluated["out"] / "Split-eval")))
    assert len(records) == len(evaluated["slices"]["eval"])
    overall = next(record for record in records if not record.slice_key.single_slice_keys)
    values = {(item.key.name, item.key.sub_key.class_id.value if item.key.HasField("sub_key") else None): item.value for item in overall.metric_keys_and_values}
    expected = evaluated["slices"]["eval"][0]["metrics"]
    assert values[("mean_iou", None)].double_value.value == pytest.approx(expected["mean_iou"])
    assert values[("iou", 1)].double_value.value == pytest.approx(expected["per_class_iou"]["cell"])
    assert list(values[("confusion_matrix", None)].array_value.int64_values) == sum(expected["confusion_matrix"], [])
    lines = [json.loads(line) for line in (evaluated["out"] / "Split-eval" / "per_image.jsonl").read_text().splitlines()]
    assert sorted(line["filename"] for line in lines) == sorted(example.filename for example, _ in evaluated["examples"])
    assert all(line["split"] == "eval" and 0.0 <= line["pixel_accuracy"] <= 1.0 and "image_size" in line["features"] for line in lines)


def test_boundary_f1_on_a_hand_made_mask() -> None:
    """Truth: class 1 from column 5 on. Prediction: from column 6 in rows 0-2, from column 9 in
    rows 3-5. Predicted boundary of class 1: (0..2, 6), (2, 7), (2, 8), (3..5, 9): 8 pixels, of
    which 4 are within 2 px of the true boundary (column 5: 6 pixels, of which rows 0-3 are
    within 2 px of a predicted one: (3, 5) is sqrt(2) from (2, 6))."""
    truth = np.zeros((6, 12), np.uint8)
    truth[:, 5:] = 1
    prediction = np.zeros((6, 12), np.uint8)
    prediction[:3, 6:] = 1
    prediction[3:, 9:] = 1
    counts = boundary_counts(truth, prediction, 2, 2.0)
    assert counts[1].tolist() == [4, 8, 4, 6]
    f1 = boundary_report(counts, ["background", "cell"])["per_class_boundary_f1"]["cell"]
    assert f1 == pytest.approx(2 * 0.5 * (4 / 6) / (0.5 + 4 / 6))
    # Row 5 unlabelled: no true boundary along it, its predicted boundary pixel is not counted.
    truth[5] = IGNORE
    assert boundary_counts(truth, prediction, 2, 2.0, IGNORE)[1].tolist() == [4, 7, 4, 5]
    assert boundary_counts(truth, prediction, 4, 4.0, IGNORE)[1].tolist() == [7, 7, 5, 5]
    # A 1 px shift is within any tolerance of 1 px or more, and nothing at tolerance 0.
    shifted = np.zeros((5, 12), np.uint8)
    shifted[:, 6:] = 1
    assert boundary_counts(truth[:5], shifted, 2, 1.0)[1].tolist() == [5, 5, 5, 5]
    assert boundary_counts(truth[:5], shifted, 2, 0.0)[1].tolist() == [0, 5, 0, 5]


def test_threshold_sweep_picks_the_separating_threshold(tmp_path: Path) -> None:
    """Foreground pixels have p 0.65 or 0.75, background 0.35, 0.55 or 0.6: at the argmax
    (0.5) the 0.55 and 0.6 pixels are wrong; 0.65 is the only grid threshold that separates."""
    rng = np.random.default_rng(1)
    examples = []
    for index in range(5):
        mask = (rng.random((10, 10)) < 0.4).astype(np.uint8)
        red = np.where(mask == 1, rng.choice([130, 150], (10, 10)), rng.choice([70, 110, 120], (10, 10)))
        mask[0, 0] = IGNORE  # its probability (whatever it is) must not count
        image = np.stack([red, np.zeros_like(red), np.zeros_like(red)], axis=-1).astype(np.uint8)
        examples.append((SegmentationExample(filename=f"s_{index}.png", image=image, mask=mask), "x"))
    write_split(tmp_path / "examples", "eval", examples)
    binary = settings(class_names=("background", "cell"), threshold_steps=20)
    splits = {"eval": eval_config([{}], binary.class_names, 20)}
    slices = run_pipeline(ForegroundFromRed(), tmp_path / "examples", splits, binary, 2, options(tmp_path), tmp_path / "out")
    sweep = slices["eval"][0]["metrics"]["threshold_sweep"]
    assert sweep["best_threshold"] == pytest.approx(0.65) and sweep["best_mean_iou"] == pytest.approx(1.0)
    assert sweep["mean_iou"][sweep["thresholds"].index(0.5)] < 1.0
    assert slices["eval"][0]["metrics"]["mean_iou"] < 1.0  # the argmax prediction


def test_flip_tta_averages_the_flipped_prediction() -> None:
    from segflow.model.tta import with_tta

    def left_heavy(images: np.ndarray) -> np.ndarray:
        width = images.shape[2]
        foreground = np.broadcast_to(np.linspace(0.0, 1.0, width), images.shape[:3])
        return np.stack([1.0 - foreground, foreground], axis=-1)

    averaged = with_tta(left_heavy, "hflip")(np.zeros((1, 2, 5, 3), np.uint8))
    np.testing.assert_allclose(averaged[..., 1], 0.5)


@pytest.mark.parametrize("tta", ["none", "hflip", "flips", "d4"])
def test_every_test_time_view_is_mapped_back_onto_the_image(tta: str) -> None:
    """A model that reads pixel values gives the same probabilities in every view, so any TTA
    returns them unchanged (views mapped back in place, on non-square images too); a model that
    also sees position gets the mean over the views, computed here view by view."""
    from segflow.model.tta import TTA_VIEWS, with_tta

    images = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 1)).astype(np.uint8)

    def by_value(batch: np.ndarray) -> np.ndarray:
        foreground = batch[..., 0] / 255.0
        return np.stack([1.0 - foreground, foreground], axis=-1)

    np.testing.assert_allclose(with_tta(by_value, tta)(images), by_value(images))

    def top_left_heavy(batch: np.ndarray) -> np.ndarray:
        rows, cols = batch.shape[1:3]
        foreground = np.broadcast_to(np.add.outer(np.arange(rows) / rows, np.arange(cols) / (2 * cols)) / 1.5, batch.shape[:3])
        return np.stack([1.0 - foreground, foreground], axis=-1)

    expected = np.mean(
        [np.rot90(top_left_heavy(np.rot90(images[:, :, ::-1] if flip else images, turns, axes=(1, 2))), -turns, axes=(1, 2))[:, :, ::-1 if flip else 1] for turns, flip in TTA_VIEWS[tta]],
        axis=0,
    )
    averaged = with_tta(top_left_heavy, tta)(images)
    np.testing.assert_allclose(averaged, expected)
    assert averaged.shape == (2, 5, 7, 2) and len(TTA_VIEWS[tta]) == {"none": 1, "hflip": 2, "flips": 4, "d4": 8}[tta]
    if tta == "d4":  # every view of the square's symmetries: the mean forgets the direction
        np.testing.assert_allclose(averaged[:, ::-1, ::-1], averaged)


def test_flip_tta_is_the_older_spelling_of_hflip() -> None:
    assert EvaluationConfig(flip_tta=True).test_time_views == "hflip"
    assert EvaluationConfig(tta="d4").test_time_views == "d4"
    with pytest.raises(ValueError, match="contradicts tta: d4"):
        EvaluationConfig(flip_tta=True, tta="d4")


class ChannelScoresModule(tf.Module):
    """A SavedModel with the served model's uint8 signature: probabilities from channel values."""

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, None], tf.uint8, name="images")])
    def serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        scores = tf.cast(images[..., :3], tf.float32) + 1.0
        probabilities = scores / tf.reduce_sum(scores, axis=-1, keepdims=True)
        return {"mask": tf.cast(tf.argmax(probabilities, axis=-1), tf.uint8), "probabilities": probabilities}


def test_evaluator_core_writes_summary_metrics_slices_tfma_files_and_blessing(evaluated: dict, tmp_path: Path) -> None:
    import tensorflow_model_analysis as tfma

    from segflow.components.evaluator import core as evaluator
    from segflow.config.experiment import validate_config
    from segflow.export.serving import SERVING_SUBDIR, ServingSpec

    serving = tmp_path / "model" / SERVING_SUBDIR
    module = ChannelScoresModule()
    tf.saved_model.save(module, str(serving), signatures={"serving_uint8": module.serve, "serving_default": module.serve})
    ServingSpec((16, 16, 3), CLASSES, False, IGNORE, "uint8", 255.0).save(serving)
    examples = evaluated["out"].parent / "examples"
    raw = {
        "name": "beam-eval", "dataset": {"images": "i", "masks": "m", "group_by": r"^([a-z]+)_"}, "classes": list(CLASSES), "ignore_index": IGNORE,
        "beam": {"running_mode": "in_memory"}, "evaluation": {"min_mean_iou": 0.0, "batch": 3},
    }
    report = evaluator.run(validate_config(raw), examples, tmp_path / "model", tmp_path / "metrics", tmp_path / "blessing")
    overall = evaluated["slices"]["eval"][0]["metrics"]
    assert report["mean_iou"] == pytest.approx(overall["mean_iou"]) and report["examples"] == 6
    assert report["confusion_matrix"] == overall["confusion_matrix"] and set(report["per_class_iou"]) == set(CLASSES)
    assert is_blessed(tmp_path / "blessing")
    slices = evaluator.read_slices(tmp_path / "metrics")
    assert set(slices) == {"eval", "test"} and slices["eval"][0]["slice"] == "Overall"
    assert {entry["slice"] for entry in slices["eval"]} >= {"source:beta", "scanner:y", "object_size:none"}
    assert tfma.load_validation_result(str(tmp_path / "metrics" / "Split-eval")).validation_ok
    result = tfma.load_eval_result(str(tmp_path / "metrics" / "Split-eval"))
    assert len(result.slicing_metrics) == len(slices["eval"])
    assert (tmp_path / "metrics" / "Split-test" / "per_image.jsonl").exists()
    raw["evaluation"] = {"min_mean_iou": 0.9, "slicing_specs": [{}, {"feature_keys": ["source"]}]}
    evaluator.run(validate_config(raw), examples, tmp_path / "model", tmp_path / "metrics", tmp_path / "blessing")
    assert (tmp_path / "blessing" / "NOT_BLESSED").exists() and not is_blessed(tmp_path / "blessing")
    failure = tfma.load_validation_result(str(tmp_path / "metrics" / "Split-eval")).metric_validations_per_slice[0].failures[0]
    assert failure.metric_key.name == "mean_iou" and failure.metric_threshold.value_threshold.lower_bound.value == pytest.approx(0.9)
    assert [entry["slice"] for entry in evaluator.read_slices(tmp_path / "metrics")["eval"]] == ["Overall", "source:alpha", "source:beta", "source:gamma"]
