"""Normalisation options: every method, with and without percentile clipping, computed by
tensorflow-transform over the train split, equals the same computation in numpy on the
train pixels; the graph the trainer uses is the one the served model embeds."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from segflow.config.experiment import validate_config

from segflow.utils.errors import ConfigError
from segflow.data.examples import split_files
from tests.conftest import tiny_raw_config
from segflow.data.preprocessing import RAW_FEATURE, TRANSFORMED_FEATURE


@pytest.fixture(scope="module")
def schema_and_examples(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ExampleGen, StatisticsGen and SchemaGen once; each case runs only the Transform."""
    from segflow.components.example_gen import core as example_gen
    from segflow.components.schema_gen import core as schema_gen
    from segflow.components.statistics_gen import core as statistics_gen

    root = tmp_path_factory.mktemp("normalization")
    config = validate_config(tiny_raw_config(tiny_data))
    example_gen.run(config, root / "examples")
    statistics_gen.run(config, root / "examples", root / "statistics")
    schema_gen.run(config, root / "statistics", root / "schema")
    return root


def _transformed(tiny_data: Path, root: Path, tmp_path: Path, normalization: Any) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(train pixels as the network sees them before normalisation, the same after the TFT
    graph, normalization.json) for a config with this `normalization`."""
    from segflow.components.transform import core as transform
    from segflow.utils.io import read_json
    from segflow.data.preprocessing import PixelSpec

    config = validate_config(tiny_raw_config(tiny_data, normalization=normalization))
    transform.run(config, root / "examples", root / "schema", tmp_path / "transform")
    pixels = PixelSpec.load(tmp_path / "transform")
    records = [record.numpy() for record in tf.data.TFRecordDataset(split_files(root / "examples", "train"), compression_type="GZIP")]
    raw = np.stack([transform.scaled_model_pixels(record, config.shape, pixels) for record in records])
    layer = transform.transform_layer(tmp_path / "transform")
    out = layer({RAW_FEATURE: tf.constant(raw)})[TRANSFORMED_FEATURE].numpy()
    return raw, out, read_json(tmp_path / "transform" / transform.NORMALIZATION_FILE)


def _expected(raw: np.ndarray, method: str, low: np.ndarray, high: np.ndarray, **settings: Any) -> np.ndarray:
    clipped = np.clip(raw, low, high)
    axes = (0, 1, 2)
    if method == "standard" and "mean" in settings:
        return (clipped - np.array(settings["mean"])) / np.array(settings["std"])
    if method == "standard":
        return (clipped - clipped.mean(axis=axes)) / clipped.std(axis=axes)
    if method == "minmax":
        lo, hi = settings.get("range", [0.0, 1.0])
        minimum, maximum = clipped.min(axis=axes), clipped.max(axis=axes)
        return (clipped - minimum) / (maximum - minimum) * (hi - lo) + lo
    if method == "max":
        return clipped / clipped.max(axis=axes)
    return clipped


@pytest.mark.parametrize(
    "normalization",
    [
        pytest.param("standard", marks=pytest.mark.slow),  # the default: every other test's transform uses it
        {"method": "standard", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]},
        {"method": "minmax", "range": [-1.0, 1.0]},
        "max",
        pytest.param("none", marks=pytest.mark.slow),
        {"method": "standard", "clip_percentiles": [2, 98]},
        {"method": "minmax", "clip_percentiles": [None, 95]},
    ],
    ids=["standard", "fixed", "minmax-range", "max", "none", "standard-clip", "minmax-clip-high"],
)
def test_normalisation_matches_numpy_on_the_train_pixels(normalization: Any, tiny_data: Path, schema_and_examples: Path, tmp_path: Path) -> None:
    raw, out, record = _transformed(tiny_data, schema_and_examples, tmp_path, normalization)
    settings = {"method": normalization} if isinstance(normalization, str) else normalization
    method = settings["method"]
    low, high = (np.array(bound, np.float32) for bound in record["clip"])
    percentiles = settings.get("clip_percentiles")
    if percentiles is None:
        assert record["clip"] == [[0.0] * 3, [1.0] * 3]
    else:
        sampled = raw[:, ::4, ::4, :].reshape(-1, 3)  # the pixels the quantile sketch sees
        for bound, percentile in zip((low, high), percentiles):
            if percentile is not None:  # TFT's sketch: within half a percent of the exact rank
                assert np.all(np.percentile(sampled, percentile - 0.5, axis=0) <= bound + 1e-6)
                assert np.all(bound <= np.percentile(sampled, percentile + 0.5, axis=0) + 1e-6)
    expected = _expected(raw, method, low, high, **{key: value for key, value in settings.items() if key in ("mean", "std", "range")})
    np.testing.assert_allclose(out, expected, atol=2e-4, rtol=1e-4)
    assert record["normalization"] == method
    np.testing.assert_allclose(np.clip(raw, low, high) * np.array(record["scale"]) + np.array(record["offset"]), out, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("normalization", "message"),
    [
        ({"method": "standard", "clip_percentiles": [99, 1]}, "low 99.0 must be below high 1.0"),
        ({"method": "standard", "clip_percentiles": [None, None]}, "give a low or a high percentile"),
        ({"method": "standard", "clip_percentiles": [-1, 50]}, "percentiles are 0..100"),
        ({"method": "standard", "mean": [0.5, 0.5, 0.5]}, "mean and std go together"),
        ({"method": "minmax", "mean": [0.5] * 3, "std": [0.2] * 3}, "for method standard"),
        ({"method": "standard", "mean": [0.5], "std": [0.2]}, r"1 values for 3 channel\(s\)"),
        ({"method": "max", "range": [-1, 1]}, "range is for method minmax"),
        ("zscore", "normalization.method"),
    ],
)
def test_normalisation_settings_that_cannot_run_are_config_errors(normalization: Any, message: str, tiny_data: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(tiny_raw_config(tiny_data, normalization=normalization))
