"""The Python API, for notebooks and scripts: the same functions the `segflow` command calls.

    import segflow.api as sf

    config = sf.load_config("configs/demo.yaml", overrides=["stages.0.epochs=1"])
    summary = sf.run(config, "runs/notebook")            # the whole DAG, as `segflow run`
    model = sf.pushed_model("model-registry", "demo")    # the version that serves (`current`)
    result = sf.predict(model, "data/demo/images", "masks/")

Each function raises instead of printing and exiting: ConfigError for a bad config,
PredictError for a bad model or input, ValueError / FileNotFoundError for a bad location.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from segflow.config.experiment import ExperimentConfig
from segflow.config.experiment import load_config as _load_config
from segflow.export.model_registry import read_aliases, read_versions, version_location
from segflow.export.predict import PredictError, PredictOptions, list_inputs, load_model, predict_files, resolve_scale

__all__ = ["PredictResult", "load_config", "predict", "pushed_model", "resume", "run"]


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read and validate an experiment YAML; `overrides` are `key.path=value` strings, as `--set`."""
    return _load_config(path, list(overrides))


def run(
    config: ExperimentConfig | str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    kind: str = "train",
    verbose: bool = False,
    image: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run the DAG locally (kind `train`: everything; `validate`: the data components only) and
    return summary.json's content. `output` defaults to runs/<name>-<timestamp>; `image` runs each
    component in a container of that image; `force` trains even when the data and config are
    those of the registry's current version (otherwise the run is `skipped`)."""
    from segflow.pipelines.local import default_output, run_local

    if not isinstance(config, ExperimentConfig):
        config = load_config(config)
    return run_local(config, output if output is not None else default_output(config), kind=kind, verbose=verbose, image=image, force=force)


def resume(run_dir: str | os.PathLike[str], *, verbose: bool = False) -> dict[str, Any]:
    """Continue an interrupted run in its folder with its own config (as `segflow run --resume`)."""
    from segflow.pipelines.local import resume_local

    return resume_local(run_dir, verbose=verbose)


def pushed_model(registry: str, name: str, version: int | None = None) -> str:
    """The location of a pushed version of model `name` (by default `current`, the one that serves)."""
    versions = read_versions(registry, name)
    if not versions:
        raise PredictError(f"{registry}: no committed version of model {name!r}")
    if version is not None and version not in versions:
        raise PredictError(f"{registry}: model {name!r} has no committed version {version}; it has {', '.join(map(str, versions))}")
    chosen = version if version is not None else read_aliases(registry, name).current
    if chosen is None:
        raise PredictError(f"{registry}: no version of model {name!r} is current (segflow registry promote VERSION makes one current); it has {', '.join(map(str, versions))}")
    return version_location(registry, name, chosen)


@dataclass(frozen=True)
class PredictResult:
    """What `predict` did: the model it loaded, the scale it predicted at, and predict.json's report."""

    model: Path
    model_note: str
    spec_source: str
    scale: tuple[float, float]
    scale_source: str
    report: dict[str, Any]


def predict(
    model: str | os.PathLike[str],
    inputs: str | os.PathLike[str],
    output: str | os.PathLike[str],
    formats: Sequence[str] = ("png",),
    options: PredictOptions | None = None,
    spec: str | os.PathLike[str] | None = None,
) -> PredictResult:
    """Segment an image or a folder of images of any size with a SavedModel, .tflite or .onnx
    (a run's model, an export or a pushed version) and write masks in `formats` to `output`."""
    options = options or PredictOptions()
    inputs_found = list_inputs(inputs)
    loaded = load_model(model, spec)
    scale, scale_source = resolve_scale(options, loaded)
    report = predict_files(loaded, inputs_found, output, list(formats), options)
    return PredictResult(loaded.path, loaded.note, loaded.spec_source, scale, scale_source, report)
