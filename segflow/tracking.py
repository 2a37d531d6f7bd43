"""Run tracking: `tracking.json` in each run folder, written when the local runner finishes.

It pins down what produced a run's numbers (the resolved config's hash, the data's
fingerprint, the segflow source and library versions) beside the numbers themselves, so
two runs can be told apart or matched without re-reading their whole folders. Artifact
paths are relative to the run folder: they stay true when the folder is uploaded or moved.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import segflow
from segflow.config import ExperimentConfig
from segflow.examples import FINGERPRINT_FILE, read_fingerprint
from segflow.io import write_json

TRACKING_FILE = "tracking.json"
# Files of a run folder worth pointing at, by what they are; absent ones are left out.
ARTIFACT_FILES = {
    "config": "config.yaml",
    "history": "trainer/model_run/history.csv",
    "training": "trainer/model_run/training.json",
    "evaluation": "evaluator/evaluation/metrics.json",
    "model": "trainer/model/Format-Serving",
    "exports_table": "exporter/exports/exports.json",
    "benchmark": "exporter/exports/benchmark.md",
}
SOURCE_ROOT = Path(segflow.__file__).resolve().parent.parent
GIT_TIMEOUT_SECONDS = 10


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
