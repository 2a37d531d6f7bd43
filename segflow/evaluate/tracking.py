"""Run tracking: `tracking.json` in each run folder, written when the local runner finishes.

It pins down what produced a run's numbers (the resolved config's hash, the data's
fingerprint, the segflow source and library versions) beside the numbers themselves, so
two runs can be told apart or matched without re-reading their whole folders. Artifact
paths are relative to the run folder: they stay true when the folder is uploaded or moved.

With `tracking.mlflow_uri` the runner also logs the finished run to MLflow (the `mlflow`
extra): for browsing and comparing many runs in MLflow's UI, while tracking.json stays the
record that needs no server.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import segflow
from segflow.config.experiment import ExperimentConfig
from segflow.data.examples import FINGERPRINT_FILE, read_fingerprint
from segflow.evaluate.analyze import ARTIFACT_FILES, SUMMARY_FILE
from segflow.utils.io import read_json, write_json
from segflow.utils.runtime import log

TRACKING_FILE = "tracking.json"
SOURCE_ROOT = Path(segflow.__file__).resolve().parent.parent
GIT_TIMEOUT_SECONDS = 10
REPORT_FILE = "report.html"  # segflow report's page (segflow.evaluate.report imports matplotlib: not imported here)
EXPORTS_FOLDER = "exporter/exports"
FINAL_METRIC_SECTIONS = ("eval", "test")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_revision() -> dict[str, Any]:
    """The git commit of the segflow source and whether tracked files differ from it, when
    that source is the top of a git checkout; None for both otherwise (an installed wheel,
    or a site-packages that happens to sit inside some other repository). Never raises:
    a missing git must not fail a finished run."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != SOURCE_ROOT:
        return {"git_commit": None, "git_dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": _git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status)}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Read from package metadata: importing TensorFlow here would cost seconds."""
    return {"segflow": segflow.__version__, "python": platform.python_version(), "tensorflow": _version("tensorflow"), "tf_keras": _version("tf-keras")}


def data_fingerprint(output: Path) -> str | None:
    examples = output / "example_gen" / "examples"
    return read_fingerprint(examples)["sha256"] if (examples / FINGERPRINT_FILE).exists() else None


def artifacts(output: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Run-folder-relative paths of the files that exist, exports by format."""
    found: dict[str, Any] = {name: relative for name, relative in ARTIFACT_FILES.items() if (output / relative).exists()}
    exports = {name: entry["path"] for name, entry in summary.get("exports", {}).items() if "path" in entry}
    if exports:
        found["exports"] = {name: os.path.relpath(path, output) for name, path in exports.items()}
    return found


def tracking_record(output: Path, config: ExperimentConfig, summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": config.name,
        "status": summary["status"],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config_hash": config.config_hash(),
        "data_fingerprint": data_fingerprint(output),
        **source_revision(),
        "versions": versions(),
        "metrics": summary.get("metrics", {}),
        "artifacts": artifacts(output, summary),
    }


def track_run(output: Path, config: ExperimentConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """Write `tracking.json` into the run folder (beside summary.json, which the runner writes
    next); returns the short entry the summary keeps under `tracking`."""
    record = tracking_record(output, config, summary)
    write_json(output / TRACKING_FILE, record)
    return {"file": TRACKING_FILE, **{key: record[key] for key in ("config_hash", "data_fingerprint", "git_commit")}}


def mlflow_params(config: ExperimentConfig) -> dict[str, str]:
    """The resolved config as dotted keys, values cut to what MLflow accepts (a path list or
    an augmentation pipeline can be longer)."""
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

    from segflow.evaluate.analyze import flatten

    flat = flatten(config.model_dump(mode="json", by_alias=True))
    return {key[:MAX_ENTITY_KEY_LENGTH]: (value if isinstance(value, str) else json.dumps(value))[:MAX_PARAM_VAL_LENGTH] for key, value in flat.items()}


def history_metrics(output: Path) -> list[tuple[str, float, int]]:
    """(key, value, epoch) for every history.csv value; a k-fold run's trainers prefixed `fold-<k>/`."""
    from segflow.evaluate.analyze import FOLD_HISTORIES, HISTORY_PATH, read_history

    histories = [("", output / HISTORY_PATH)] + [(f"{path.parents[1].name}/", path) for path in sorted(output.glob(FOLD_HISTORIES))]
    found = []
    for prefix, path in histories:
        columns = read_history(path)
        epochs = columns.pop("epoch", [])
        for key, values in columns.items():
            found += [(prefix + key, value, int(epoch)) for epoch, value in zip(epochs, values) if not math.isnan(value)]
    return found


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """summary.json's eval/test numbers as `eval.mean_iou`, `eval.iou.<class>` (the names
    segflow analyze shows), and each fold's as `fold-<k>/eval.mean_iou`."""
    metrics = summary.get("metrics") or {}
    sections = [("", name, metrics[name]) for name in FINAL_METRIC_SECTIONS if name in metrics]
    sections += [(f"fold-{fold['fold']}/", name, fold[name]) for fold in metrics.get("folds", []) for name in FINAL_METRIC_SECTIONS if name in fold]
    found: dict[str, float] = {}
    for prefix, name, section in sections:
        found.update({f"{prefix}{name}.{key}": float(value) for key, value in section.items() if isinstance(value, (int, float)) and not isinstance(value, bool)})
        found.update({f"{prefix}{name}.iou.{label}": float(iou) for label, iou in section.get("per_class_iou", {}).items() if iou is not None})
    return found


def _log_run(uri: str, experiment: str, name: str, output: Path, config: ExperimentConfig, summary: dict[str, Any], record: dict[str, Any]) -> str:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    tags = {"segflow.config_hash": record["config_hash"], "segflow.data_fingerprint": record["data_fingerprint"], "segflow.git_commit": record["git_commit"], "segflow.version": record["versions"]["segflow"]}
    run_id = client.create_run(experiment_id, run_name=name, tags={key: str(value) for key, value in tags.items() if value is not None}).info.run_id
    try:
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value, step in history_metrics(output)]
        metrics += [Metric(key, value, now, 0) for key, value in final_metrics(summary).items()]
        client.log_batch(run_id, metrics=metrics, params=[Param(key, value) for key, value in mlflow_params(config).items()], tags=[RunTag("segflow.status", summary["status"])])
        client.log_dict(run_id, summary, SUMMARY_FILE)
        for relative in (TRACKING_FILE, ARTIFACT_FILES["config"], REPORT_FILE):
            if (output / relative).is_file():
                client.log_artifact(run_id, str(output / relative))
        if (output / EXPORTS_FOLDER).is_dir():
            client.log_artifacts(run_id, str(output / EXPORTS_FOLDER), "exports")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED" if summary["status"] == "succeeded" else "FAILED")
    return run_id


def log_to_mlflow(output: Path, config: ExperimentConfig, summary: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """Log a finished run (tracking.json already written) to MLflow as one run named `name`
    (default: the run folder's name) and add the outcome to tracking.json under `mlflow`, which
    it returns. A failure (no server, no mlflow installed) is a warning: the run's own files
    are complete, and a tracking server must not turn a finished run into a failed one."""
    uri = config.tracking.mlflow_uri
    assert uri is not None, "log_to_mlflow needs tracking.mlflow_uri"
    record = read_json(output / TRACKING_FILE)
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses its file store (maintenance mode) unless opted in; a config that
        # names one has chosen it, and mlflow-skinny has no database store to offer instead.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        outcome: dict[str, Any] = {"uri": uri, "run_id": _log_run(uri, config.tracking.experiment or config.name, name or output.name, output, config, summary, record)}
    except ImportError as error:
        outcome = {"uri": uri, "error": f"mlflow is not installed ({error}): pip install 'segflow[mlflow]'"}
    except Exception as error:  # any MLflow or network failure: reported, not raised
        outcome = {"uri": uri, "error": f"{type(error).__name__}: {error}"}
    if "error" in outcome:
        log(f"warning: MLflow logging to {uri} failed, the run is unaffected (see {TRACKING_FILE}): {outcome['error']}")
    write_json(output / TRACKING_FILE, {**record, "mlflow": outcome})
    return outcome
