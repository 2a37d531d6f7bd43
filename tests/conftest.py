"""Shared fixtures: tiny synthetic datasets and configs, and one tiny trained model."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

import segflow  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
from segflow.config.experiment import ExperimentConfig, validate_config
from segflow.data.demo_data import CLASS_NAMES, write_demo_dataset

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def tiny_raw_config(data: Path, **overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "tiny",
        "dataset": {"images": str(data / "images"), "masks": str(data / "masks"), "eval_split": 0.25},
        "classes": list(CLASS_NAMES),
        "shape": [32, 32, 3],
        "model": {"depth": 2, "base_filters": 4},
        "augmentation": {"HorizontalFlip": {"p": 0.5}},
        "loss": "crossentropy+0.5*dice",
        "batch": 4,
        "stages": [{"epochs": 1, "learning_rate": 0.003}],
        "export": ["saved_model", "tflite_int8"],
        "beam": {"running_mode": "in_memory"},
    }
    raw.update(overrides)
    return raw


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("tiny") / "data", count=20, size=32)


@pytest.fixture
def make_config(tiny_data: Path) -> Callable[..., ExperimentConfig]:
    def make(**overrides: Any) -> ExperimentConfig:
        return validate_config(tiny_raw_config(tiny_data, **overrides))

    return make


def train_cores(config: ExperimentConfig, root: Path) -> dict[str, Any]:
    """ExampleGen -> StatisticsGen -> SchemaGen -> Transform -> Trainer cores into `root`."""
    from segflow.components.example_gen import core as example_gen
    from segflow.components.schema_gen import core as schema_gen
    from segflow.components.statistics_gen import core as statistics_gen
    from segflow.components.trainer import core as trainer
    from segflow.components.transform import core as transform

    example_gen.run(config, root / "examples")
    statistics_gen.run(config, root / "examples", root / "statistics")
    schema_gen.run(config, root / "statistics", root / "schema")
    transform.run(config, root / "examples", root / "schema", root / "transform")
    trainer.run(config, root / "examples", root / "transform", root / "model", root / "model_run")
    return {
        "config": config,
        "root": root,
        **{name: root / name for name in ("examples", "statistics", "schema", "transform", "model", "model_run")},
    }


@pytest.fixture(scope="session")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The whole training path (1 epoch, then 1 of quantization-aware training for the
    tflite_int8_qat export) on the tiny dataset, run once per session."""
    return train_cores(validate_config(tiny_raw_config(tiny_data, qat={"epochs": 1})), tmp_path_factory.mktemp("trained"))


def pusher_inputs(
    root: Path, blessed: bool = True, baseline_version: int | None = None, mean_iou: float = 0.5, parent: int | None = None
) -> dict[str, Any]:
    """What the Pusher reads besides the exports, as the Trainer, Evaluator and ExampleGen write
    it: the network (warm-started from `parent`), the data statistics, the blessing (compared with
    `baseline_version`, None: there was none), metrics and examples' counts and fingerprint;
    keywords for `segflow.components.pusher.core.run`."""
    from segflow.data.examples import COUNTS_FILE, FINGERPRINT_FILE, STATISTICS_FILE
    from segflow.evaluate.evaluation import BLESSED, BLESSING_FILE, METRICS_FILE, NOT_BLESSED
    from segflow.train.warm_start import NETWORK_FOLDER, NETWORK_RECIPE, NETWORK_WEIGHTS
    from segflow.utils.io import write_json

    for name in ("blessing", "examples", "evaluation", "statistics", f"model/{NETWORK_FOLDER}"):
        (root / name).mkdir(parents=True)
    (root / "model" / NETWORK_FOLDER / NETWORK_WEIGHTS).write_bytes(b"weights")
    write_json(root / "model" / NETWORK_FOLDER / NETWORK_RECIPE, {"architecture": "unet", "parent": parent})
    baseline = {"version": baseline_version, "location": None if baseline_version is None else "saved_model", "reason": None}
    write_json(root / "blessing" / BLESSING_FILE, {"blessed": blessed, "failed": [] if blessed else ["min_mean_iou"], "thresholds": [], "baseline": baseline})
    (root / "blessing" / (BLESSED if blessed else NOT_BLESSED)).write_text("")
    write_json(root / "examples" / COUNTS_FILE, {"train": 6, "eval": 2})
    write_json(root / "statistics" / STATISTICS_FILE, {"train": {"class_frequency": [1.0]}})
    write_json(root / "examples" / FINGERPRINT_FILE, {"sha256": "e" * 64, "shards": {}})
    write_json(root / "evaluation" / METRICS_FILE, {"mean_iou": mean_iou, "per_class_iou": {}})
    return {
        "model_dir": root / "model", "statistics_dir": root / "statistics", "blessing_dir": root / "blessing", "examples_dir": root / "examples", "evaluation_dir": root / "evaluation",
        "config_hash": "c" * 64, "dataset_fingerprint": "d" * 64,
    }


def require_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"real dataset {path} is absent (see ../shared/datasets/README.md)")
    return path
