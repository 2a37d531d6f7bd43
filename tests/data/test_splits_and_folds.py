"""Named eval/test folders and k-fold cross-validation: how examples are assigned, what each
fold's trainer sees, and the whole k-fold DAG through kfp.local with a test split scored by
the ensemble of the fold models."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from segflow.cli import main
from segflow.components.example_gen import core as example_gen
from segflow.config.experiment import validate_config
from segflow.utils.errors import ConfigError
from segflow.data.demo_data import write_demo_dataset
from segflow.export.serving import SERVING_SUBDIR
from segflow.data.examples import assign_folds, assign_splits, group_key, iter_split, present_splits
from tests.conftest import tiny_raw_config
from segflow.data.examples import read_counts


@pytest.fixture(scope="module")
def test_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second synthetic dataset (other seed) standing in for a dataset's official test folder."""
    return write_demo_dataset(tmp_path_factory.mktemp("test-split") / "data", count=6, size=32, seed=7)


def _raw(tiny_data: Path, **dataset: Any) -> dict[str, Any]:
    raw = tiny_raw_config(tiny_data)
    raw["dataset"] = {"images": str(tiny_data / "images"), "masks": str(tiny_data / "masks"), **dataset}
    return raw


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_folds_are_balanced_deterministic_and_keep_groups_whole(folds: int) -> None:
    stems = [f"seq{index % 7}_{index:03d}" for index in range(40)]
    assigned = assign_folds(stems, folds, r"^seq\d+")
    assert assigned == assign_folds(list(reversed(stems)), folds, r"^seq\d+")  # a function of the names, not their order
    assert set(assigned.values()) == set(range(folds))
    for group in {group_key(stem, r"^seq\d+") for stem in stems}:
        assert len({assigned[stem] for stem in stems if stem.startswith(group + "_")}) == 1
    plain = Counter(assign_folds([f"{index:03d}" for index in range(30)], folds).values())
    assert max(plain.values()) - min(plain.values()) <= 1  # without groups the folds differ by one example at most


GROWN = 0.3  # a night's new data: 30% more files


def _grown(stems: list[str]) -> list[str]:
    """The stems plus 30% new ones interleaved by name, and one old file removed."""
    new = [f"new_{stem}" for stem in stems[: int(len(stems) * GROWN)]]
    return sorted(stems[1:] + new)


@pytest.mark.parametrize("group_by", [None, r"^(seq\d+)_"])
def test_stable_assignment_never_moves_a_file_as_data_grows(group_by: str | None) -> None:
    """dataset.assignment stable: adding 30% new files (and removing one) moves no existing
    file's split or fold; with group_by every group still stays whole."""
    stems = [f"seq{index % 23}_{index:04d}" for index in range(200)]
    grown = _grown(stems)
    before, after = assign_splits(stems, 0.2, group_by, stable=True), assign_splits(grown, 0.2, group_by, stable=True)
    assert all(after[stem] == before[stem] for stem in after if stem in before)
    for folds in (3, 5):
        before_folds, after_folds = assign_folds(stems, folds, group_by, stable=True), assign_folds(grown, folds, group_by, stable=True)
        assert all(after_folds[stem] == before_folds[stem] for stem in after_folds if stem in before_folds)
        if group_by:
            by_group: dict[str, set[int]] = {}
            for stem, fold in after_folds.items():
                by_group.setdefault(group_key(stem, group_by), set()).add(fold)
            assert all(len(found) == 1 for found in by_group.values())


def test_exact_assignment_moves_files_as_data_grows_which_stable_exists_for() -> None:
    """Why `stable` exists: the exact share re-ranks the cutoff when files arrive, so some
    existing files change split (a file moving from train to eval would be scored by a model
    that trained on it)."""
    stems = [f"img_{index:04d}" for index in range(48)]
    before, after = assign_splits(stems, 0.2), assign_splits(_grown(stems), 0.2)
    assert any(after[stem] != before[stem] for stem in after if stem in before)


def test_stable_shares_are_right_on_average_and_too_few_files_is_a_clear_error() -> None:
    stems = [f"img_{index:05d}" for index in range(4000)]
    share = Counter(assign_splits(stems, 0.2, stable=True).values())["eval"] / len(stems)
    assert 0.18 < share < 0.22
    sizes = Counter(assign_folds(stems, 5, stable=True).values())
    assert sorted(sizes) == [0, 1, 2, 3, 4] and all(700 < size < 900 for size in sizes.values())
    with pytest.raises(ValueError, match="use dataset.assignment: exact"):
        assign_splits(["a", "b"], 0.01, stable=True)
    with pytest.raises(ValueError, match=r"left fold\(s\) \[0\] of 3 empty"):
        assign_folds(["a", "b", "c"], 3, stable=True)  # their buckets modulo 3 are 1, 1, 2
    assert sorted(set(assign_folds(["p", "q", "r"], 3, stable=True).values())) == [0, 1, 2]


def test_assignment_is_a_config_key_with_exact_as_default(tiny_data: Path) -> None:
    assert validate_config(_raw(tiny_data)).dataset.assignment == "exact"
    assert validate_config(_raw(tiny_data, assignment="stable")).dataset.assignment == "stable"
    with pytest.raises(ConfigError, match="dataset.assignment"):
        validate_config(_raw(tiny_data, assignment="growing"))


def test_folds_need_a_group_per_fold() -> None:
    with pytest.raises(ValueError, match="3 folds"):
        assign_folds(["a_1", "a_2", "b_1"], 3, r"^[ab]")


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ({"eval_split": 0.3, "eval": {"images": "x", "masks": "y"}}, "eval_split and eval are exclusive"),
        ({"folds": 3, "eval_split": 0.3}, "folds replaces the eval split"),
        ({"folds": 3, "eval": {"images": "x", "masks": "y"}}, "folds replaces the eval split"),
        ({"folds_to_train": [0]}, "folds_to_train needs folds"),
        ({"folds": 3, "folds_to_train": [1, 3]}, r"fold ids \[3\] outside 0..2"),
        ({"folds": 1}, "dataset.folds"),
    ],
)
def test_split_choices_that_cannot_run_are_config_errors(tiny_data: Path, dataset: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(_raw(tiny_data, **dataset))


def test_named_eval_and_test_folders_become_their_splits(tiny_data: Path, test_folder: Path, tmp_path: Path) -> None:
    """The eval folder is the eval split and the test folder the test split, whole; every
    file of images/masks trains; statistics and validation cover the test split too."""
    from segflow.components.example_validator import core as example_validator
    from segflow.components.schema_gen import core as schema_gen
    from segflow.components.statistics_gen import core as statistics_gen

    folders = {"images": str(test_folder / "images"), "masks": str(test_folder / "masks")}
    config = validate_config(_raw(tiny_data, eval=folders, test=folders))
    counts = example_gen.run(config, tmp_path / "examples")
    assert present_splits(tmp_path / "examples") == ["train", "eval", "test"]
    assert (counts["train_examples"], counts["eval_examples"], counts["test_examples"]) == (20, 6, 6)
    assert counts["examples_in"] == counts["examples_written"] == 32
    assert sorted(example.filename for example in iter_split(tmp_path / "examples", "test")) == sorted(p.name for p in (test_folder / "images").iterdir())
    statistics = statistics_gen.run(config, tmp_path / "examples", tmp_path / "statistics")
    assert set(statistics) == {"class_names", "train", "eval", "test"}
    schema_gen.run(config, tmp_path / "statistics", tmp_path / "schema")
    example_validator.run(config, tmp_path / "statistics", tmp_path / "schema", tmp_path / "anomalies")


def test_an_empty_named_test_folder_is_an_error_naming_it(tiny_data: Path, tmp_path: Path) -> None:
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    folders = {"images": str(tmp_path / "empty" / "images"), "masks": str(tmp_path / "empty" / "masks")}
    with pytest.raises(example_gen.NoUsableExamplesError, match=r"test split is empty.*empty/images"):
        example_gen.run(validate_config(_raw(tiny_data, test=folders)), tmp_path / "examples")


def test_fold_view_holds_out_exactly_one_fold(tiny_data: Path, tmp_path: Path) -> None:
    config = validate_config(_raw(tiny_data, folds=3))
    counts = example_gen.run(config, tmp_path / "examples")
    assert present_splits(tmp_path / "examples") == ["train"] and sum(counts["fold_examples"]) == counts["train_examples"] == 20
    folds = {example.filename: example.fold for example in iter_split(tmp_path / "examples", "train")}
    for fold in range(3):
        view = example_gen.write_fold_view(tmp_path / "examples", fold, tmp_path / f"view-{fold}")
        train = {example.filename for example in iter_split(view, "train")}
        held_out = {example.filename for example in iter_split(view, "eval")}
        assert held_out == {name for name, value in folds.items() if value == fold}
        assert train == set(folds) - held_out
        assert read_counts(view)["eval_examples"] == counts["fold_examples"][fold]
    with pytest.raises(ValueError, match="fold 3 outside 0..2"):
        example_gen.write_fold_view(tmp_path / "examples", 3, tmp_path / "view-3")


def test_validation_choices_name_what_reads_the_scored_fold(tiny_data: Path) -> None:
    """A k-fold trainer validates on the fold its evaluator scores; the trainer's log names
    every setting that turns that validation into a choice (validation_choices)."""
    raw = _raw(tiny_data, folds=3)
    assert validate_config(raw).validation_choices == []  # restore last, no early stop, no plateau
    raw["callbacks"] = {"keep_best": 1, "restore": "best"}
    raw["stages"] = [
        {"epochs": 2},
        {"epochs": 2, "callbacks": {"early_stopping": {"patience": 1}}, "schedule": {"name": "constant", "reduce_on_plateau": {"patience": 1}}},
    ]
    assert validate_config(raw).validation_choices == ["stages.0: restore: best", "stages.1: early_stopping", "stages.1: reduce_on_plateau"]


@pytest.mark.extended
def test_kfold_run_reports_every_fold_and_the_test_ensemble(tiny_data: Path, test_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`segflow run` with folds: one trainer and evaluator per fold (ParallelFor), then
    cross_validation: per-fold figures, pooled out-of-fold metrics, and the ensemble's test
    metrics, which equal a direct computation from the fold models' mean probabilities."""
    import tensorflow as tf

    from segflow.model.metrics import ConfusionMatrix

    raw = _raw(tiny_data, folds=3, folds_to_train=[0, 2], test={"images": str(test_folder / "images"), "masks": str(test_folder / "masks")})
    (tmp_path / "kfold.yaml").write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert main(["run", str(tmp_path / "kfold.yaml"), "-o", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "mean IoU over 2 folds" in printed and "ensemble of the folds, 6 examples" in printed
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "succeeded" and "exports" not in summary and "blessed" not in summary
    assert list(summary["components"]) == [
        "dataset_fingerprint", "example_gen", "statistics_gen", "schema_gen", "example_validator", "transform",
        "trainer/fold-0", "trainer/fold-2", "evaluator/fold-0", "evaluator/fold-2", "cross_validation",
    ]
    metrics = summary["metrics"]
    fold_sizes = summary["counts"]["fold_examples"]
    assert [entry["fold"] for entry in metrics["folds"]] == [0, 2]
    assert [entry["eval"]["examples"] for entry in metrics["folds"]] == [fold_sizes[0], fold_sizes[2]]
    assert metrics["eval"]["examples"] == fold_sizes[0] + fold_sizes[2]
    assert metrics["eval"]["fold_mean_iou"] == [entry["eval"]["mean_iou"] for entry in metrics["folds"]]
    assert metrics["eval"]["mean_iou_fold_mean"] == pytest.approx(np.mean(metrics["eval"]["fold_mean_iou"]))
    assert all(entry["test"]["examples"] == 6 for entry in metrics["folds"])

    models = [tf.saved_model.load(str(run / "trainer" / f"fold-{fold}" / "model" / SERVING_SUBDIR)) for fold in (0, 2)]
    matrix = ConfusionMatrix(len(raw["classes"]), None)
    for example in iter_split(run / "example_gen" / "examples", "test"):
        images = tf.constant(example.image[None])
        mean = np.mean([model.signatures["serving_uint8"](images=images)["probabilities"].numpy()[0] for model in models], axis=0)
        matrix.update(example.mask, mean.argmax(axis=-1))
    test = json.loads((run / "cross_validation" / "evaluation" / "test_metrics.json").read_text())
    assert np.array_equal(np.array(test["confusion_matrix"]), matrix.matrix)
    assert metrics["test"]["mean_iou"] == pytest.approx(test["mean_iou"])
