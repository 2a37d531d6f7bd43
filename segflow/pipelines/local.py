"""Run a pipeline locally through kfp.local (SubprocessRunner in this environment).

The run folder gets one sub-folder per component (its artifacts and `component.json`),
the resolved `config.yaml` and `summary.json`: the contract scripts and CI read.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, TextIO

from segflow.components.evaluator.core import read_metrics, read_test_metrics
from segflow.components.example_validator.core import read_anomalies
from segflow.components.exporter.core import read_exports
from segflow.components.pusher.core import PUSH_FILE, RUN_FOLDER_ENV
from segflow.components.retrain_gate.core import DECISION_FILE, read_decision
from segflow.components.trainer.core import TRAINING_FILE
from segflow.config.component_config import location_arguments, resolve_locations
from segflow.config.experiment import ExperimentConfig
from segflow.console import LOG_FILE, MARK, Renderer, parse_records
from segflow.data.examples import (
    ANOMALIES_FILE,
    COUNTS_FILE,
    QUARANTINE_FILE,
    read_counts,
    read_fingerprint,
)
from segflow.evaluate.analyze import SUMMARY_FILE
from segflow.evaluate.evaluation import METRICS_FILE, is_blessed, read_blessing
from segflow.evaluate.tracking import log_to_mlflow, track_run
from segflow.export.exporters import EXPORTS_FILE
from segflow.utils import storage
from segflow.utils.io import atomic_write_text, read_json, write_json
from segflow.utils.runtime import environment_variable, log, read_record

RESUME_FOLDER = ".resume-backup"  # an interrupted run's trainer backup, kept until a resumed trainer takes it


class _Console(io.TextIOBase):
    """What the run prints while kfp.local runs the DAG: kfp.local's banners, output dumps and
    the relayed output of each component's subprocess come in; segflow's own lines go out,
    and progress records become bars (segflow.console). `verbose`: every line goes out.
    Every line also goes to `transcript` (the run folder's log); each component's whole
    output is in its own folder's log too (segflow.utils.runtime)."""

    def __init__(self, target: TextIO, transcript: TextIO, verbose: bool = False) -> None:
        self.renderer = Renderer(target)
        self.transcript = transcript
        self.verbose = verbose
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        self.transcript.write(line + "\n")
        records = parse_records(line)
        if records is not None:
            for record in records:
                self.renderer.record(record)
        elif self.verbose:
            self.renderer.line(line)
        elif line.lstrip().startswith(MARK) or " - ERROR - " in line:  # kfp.local's errors: a task that failed before segflow's code ran
            self.renderer.line(line.strip())

    def flush(self) -> None:
        self.transcript.flush()
        self.renderer.stream.flush()


@contextlib.contextmanager
def _console(verbose: bool, transcript: Path) -> Iterator[None]:
    stdout = sys.stdout
    with open(transcript, "a", encoding="utf-8") as file:
        console = _Console(stdout, file, verbose)
        sys.stdout = console  # type: ignore[assignment]
        try:
            yield
        finally:
            sys.stdout = stdout
            console.renderer.close()


def _descendants(pid: int) -> list[int]:
    """Live descendants of `pid`, read from /proc (none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])  # after "pid (name)": state, ppid
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


@contextlib.contextmanager
def _components_stop_with_run() -> Iterator[None]:
    """SIGTERM to `segflow run` (`kill PID`, a scheduler's stop) also stops the component it is
    running: kfp.local's component subprocesses outlive their parent, and an orphaned trainer
    trains on for hours, writing into the run folder. The run exits with 128 + SIGTERM; a
    trainer's backup stays for `--resume`. Ctrl-C needs no help: the terminal signals the group."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        for child in _descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def default_output(config: ExperimentConfig) -> Path:
    return Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_local(
    config: ExperimentConfig, output: str | os.PathLike[str], kind: str = "train", verbose: bool = False, image: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Execute the DAG with kfp.local and write `summary.json`; returns the summary. `force`
    trains even when nothing changed since the registry's current version (RetrainGate).

    Components run in this environment (SubprocessRunner), or with `image` each in a container
    of that image (DockerRunner against Docker or podman; segflow.cluster.containers).

    `output` is a local folder, or a gs:// / s3:// URI: kfp.local needs a local pipeline
    root, so the run then happens in a local temporary folder that is uploaded when the run
    ends, `summary.json` last (its artifact paths rewritten to URIs), and removed."""
    location = os.fspath(output)
    if not storage.is_local(location):
        return _run_to_uri(config, location, kind, verbose, image, force)
    output = Path(storage.local_path(location)).resolve()
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output}: run folder exists and is not empty; choose another --output")
    summary = _execute(config, output, kind, verbose, shown=str(output), image=image, force=force)
    write_json(output / SUMMARY_FILE, summary)
    return summary


def resume_local(output: str | os.PathLike[str], verbose: bool = False) -> dict[str, Any]:
    """Rerun an interrupted local run in its folder with its own `config.yaml`: the data
    components run again (they are deterministic), and the trainer continues from the
    interrupted trainer's `backup/` (its last finished epoch, optimizer state included)."""
    from segflow.components.trainer.core import BACKUP_FOLDER, RESUME_BACKUP_ENV
    from segflow.config.experiment import load_config

    if not storage.is_local(os.fspath(output)):
        raise ValueError(f"{output}: --resume needs a local run folder")
    output = Path(storage.local_path(os.fspath(output))).resolve()
    if not (output / "config.yaml").exists():
        raise FileNotFoundError(f"{output}: no config.yaml; not a segflow run folder")
    if (output / SUMMARY_FILE).exists() and read_json(output / SUMMARY_FILE)["status"] == "succeeded":
        raise FileExistsError(f"{output}: the run succeeded; nothing to resume")
    config = load_config(output / "config.yaml")
    if config.dataset.folds is not None:
        raise ValueError(f"{output}: --resume does not continue k-fold runs (dataset.folds); run it again, or train the remaining folds with dataset.folds_to_train")
    kept = output / RESUME_FOLDER
    # Killed with `segflow run` itself, the trainer's folder is still under kfp.local's root.
    found = [*sorted((output / ".kfp").glob(f"*/trainer/{BACKUP_FOLDER}")), output / "trainer" / BACKUP_FOLDER]
    backups = [path for path in found if path.is_dir()]
    if backups:
        shutil.rmtree(kept, ignore_errors=True)
        os.replace(backups[-1], kept)
    if kept.is_dir():
        log(f"resuming {output}: the trainer continues from its backup")
    else:
        log(f"resuming {output}: no trainer backup (the run stopped before training); training starts at epoch 1")
    for stale in (output / ".kfp", *(output / name for name in COMPONENTS["train"])):
        shutil.rmtree(stale, ignore_errors=True)
    (output / SUMMARY_FILE).unlink(missing_ok=True)
    with environment_variable(RESUME_BACKUP_ENV, str(kept)):  # the trainer's subprocess inherits it
        # forced: the interrupted run had passed RetrainGate (or was itself forced)
        summary = _execute(config, output, "train", verbose, shown=str(output), force=True)
    write_json(output / SUMMARY_FILE, summary)
    return summary


def _run_to_uri(config: ExperimentConfig, location: str, kind: str, verbose: bool, image: str | None = None, force: bool = False) -> dict[str, Any]:
    summary_location = storage.join(location, SUMMARY_FILE)
    if storage.exists(summary_location):
        raise FileExistsError(f"{location}: run folder already has a {SUMMARY_FILE}; choose another --output")
    scratch = Path(tempfile.mkdtemp(prefix="segflow-run-"))
    try:
        summary = relocate_summary(_execute(config, scratch, kind, verbose, shown=location, image=image, force=force), scratch, location)
        log(f"uploading the run folder to {location}")
        storage.upload_folder(scratch, location)
        # Last, and only if no other run wrote one meanwhile: a reader never sees a summary
        # whose files are missing.
        write_json(scratch / SUMMARY_FILE, summary)
        storage.write_bytes(summary_location, (scratch / SUMMARY_FILE).read_bytes(), exclusive=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return summary


def _execute(config: ExperimentConfig, output: Path, kind: str, verbose: bool, shown: str, image: str | None = None, force: bool = False) -> dict[str, Any]:
    """Run the DAG into the local folder `output` (`shown` is what the progress calls it);
    returns the summary, written by the caller."""
    from kfp import local

    from segflow.pipelines.pipeline import PARAMETERS, build_pipeline

    output.mkdir(parents=True, exist_ok=True)
    config = resolve_locations(config)
    atomic_write_text(output / "config.yaml", config.to_yaml())
    kfp_root = output / ".kfp"
    started = time.perf_counter()
    log(f"run folder {shown}")
    if image is None:
        runner: contextlib.AbstractContextManager[Any] = contextlib.nullcontext(local.SubprocessRunner(use_venv=False))
    else:
        from segflow.cluster.containers import docker_runner

        runner = docker_runner(config, image)
    with _components_stop_with_run(), environment_variable(RUN_FOLDER_ENV, shown), runner as chosen:
        local.init(runner=chosen, pipeline_root=str(kfp_root), raise_on_error=False)
        with warnings.catch_warnings(), _console(verbose, output / LOG_FILE):
            # The SubprocessRunner warns that it ignores base_image: intended, it runs this environment.
            warnings.filterwarnings("ignore", category=RuntimeWarning, module="kfp.local.subprocess_task_handler")
            build_pipeline(config, kind)(**location_arguments(config, PARAMETERS[kind]), **({"force": force} if kind == "train" else {}))
    _collect_task_folders(kfp_root, output, config.dataset.trained_folds())
    summary = build_summary(output, config, kind, time.perf_counter() - started)
    summary["tracking"] = track_run(output, config, summary)
    if config.tracking.mlflow_uri:
        summary["tracking"]["mlflow"] = log_to_mlflow(output, config, summary, name=PurePosixPath(shown).name)
    return summary


def _split_metrics(evaluation: Path) -> dict[str, Any]:
    """{"eval": ..., "test": ...} of an evaluation artifact, without the confusion matrices
    (kept in its metrics files; too big for a summary)."""
    found = {"eval": read_metrics(evaluation)}
    test = read_test_metrics(evaluation)
    if test is not None:
        found["test"] = test
    for metrics in found.values():
        metrics.pop("confusion_matrix", None)
        metrics.get("baseline", {}).pop("confusion_matrix", None)
    return found


def relocate_summary(summary: dict[str, Any], local_dir: str | os.PathLike[str], location: str) -> dict[str, Any]:
    """A copy of `summary` whose artifact paths (`quarantine`, `exports.*.path`,
    `push.destination`) below `local_dir` name the same files below `location`, where the
    folder was uploaded. Paths elsewhere (a local registry, a URI) stay as they are."""
    local_dir = os.path.abspath(local_dir)

    def moved(path: str) -> str:
        if storage.is_uri(path):
            return path
        relative = os.path.relpath(os.path.abspath(path), local_dir)
        if relative == os.pardir or relative.startswith(os.pardir + os.sep):
            return path
        return storage.join(location, *relative.split(os.sep))

    summary = copy.deepcopy(summary)
    if "quarantine" in summary:
        summary["quarantine"] = moved(summary["quarantine"])
    for entry in summary.get("exports", {}).values():
        if "path" in entry:  # a skipped export has none
            entry["path"] = moved(entry["path"])
    if "destination" in summary.get("push", {}):
        summary["push"]["destination"] = moved(summary["push"]["destination"])
    return summary


def _collect_task_folders(kfp_root: Path, output: Path, folds: list[int]) -> None:
    """Move kfp.local's `<root>/<pipeline-run>/<task-name>/` up to `<output>/<component>/`; a
    k-fold run's `for-loop-*-iteration-<i>/<task-name>/` to `<output>/<component>/fold-<fold>/`."""
    for run_dir in kfp_root.iterdir() if kfp_root.exists() else []:
        for task_dir in run_dir.iterdir():
            iteration = re.fullmatch(r"for-loop-\d+-iteration-(\d+)", task_dir.name)
            if iteration is None:
                os.replace(task_dir, output / task_dir.name.replace("-", "_"))
                continue
            for fold_task in task_dir.iterdir():
                target = output / fold_task.name.replace("-", "_") / f"fold-{folds[int(iteration.group(1))]}"
                target.parent.mkdir(exist_ok=True)
                os.replace(fold_task, target)
    shutil.rmtree(kfp_root, ignore_errors=True)


COMPONENTS = {
    "train": [
        "dataset_fingerprint", "retrain_gate", "example_gen", "statistics_gen", "schema_gen", "example_validator", "transform", "trainer", "evaluator",
        "exporter", "pusher",
    ],
    "validate": ["dataset_fingerprint", "example_gen", "statistics_gen", "schema_gen", "example_validator"],
}
FOLD_TASKS = ("trainer", "evaluator")  # run once per fold in a k-fold run
BLESSED_ONLY = ("exporter", "pusher")  # run only for a blessed model (dsl.If in the DAG)


def component_folders(config: ExperimentConfig, kind: str) -> list[str]:
    """The run folder's component folders (relative), in DAG order: a k-fold run has no
    retrain_gate, a trainer and evaluator folder per fold, then cross_validation, and no
    exporter or pusher."""
    if kind != "train" or config.dataset.folds is None:
        return COMPONENTS[kind]
    data = [name for name in COMPONENTS["train"][: COMPONENTS["train"].index("trainer")] if name != "retrain_gate"]
    folds = config.dataset.trained_folds()
    return data + [f"{task}/fold-{fold}" for task in FOLD_TASKS for fold in folds] + ["cross_validation"]


def build_summary(output: Path, config: ExperimentConfig, kind: str, seconds: float) -> dict[str, Any]:
    """summary.json. A model that is not blessed is not exported or pushed (the DAG's dsl.If):
    those components are "skipped" and the run still "succeeded", with `blessed` false and
    the failed thresholds under `blessing`. When RetrainGate found nothing new, everything
    after it is "skipped" and so is the run, with the gate's one-line `reason`."""
    blessing = read_blessing(output / "evaluator" / "blessing")
    gate = output / "retrain_gate" / "decision"
    decision = read_decision(gate) if (gate / DECISION_FILE).exists() else None
    nothing_new = decision is not None and not decision["train"]
    components = {}
    for name in component_folders(config, kind):
        record = read_record(output / name)
        if record is None and nothing_new:
            components[name] = {"status": "skipped", "reason": decision["reason"]}
        elif record is None and name in BLESSED_ONLY and blessing is not None and not blessing["blessed"]:
            components[name] = {"status": "skipped", "reason": "model not blessed"}
        else:
            components[name] = {"status": "not_run"} if record is None else {key: value for key, value in record.items() if key != "component"}
    succeeded = all(entry["status"] in ("succeeded", "skipped") for entry in components.values())
    summary: dict[str, Any] = {
        "status": ("skipped" if nothing_new else "succeeded") if succeeded else "failed",
        "name": config.name,
        "pipeline": kind,
        "seconds": round(seconds, 1),
        "config_hash": config.config_hash(),
        "components": components,
    }
    if decision is not None:
        summary["retrain"] = decision
    if nothing_new:
        summary["reason"] = decision["reason"]
    examples = output / "example_gen" / "examples"
    if (examples / COUNTS_FILE).exists():
        summary["counts"] = read_counts(examples)
        summary["quarantine"] = str(examples / QUARANTINE_FILE)
        summary["data_fingerprint"] = read_fingerprint(examples)["sha256"]
    anomalies = output / "example_validator" / "anomalies"
    if (anomalies / ANOMALIES_FILE).exists():
        summary["anomalies"] = read_anomalies(anomalies)
    evaluation = output / "evaluator" / "evaluation"
    if (evaluation / METRICS_FILE).exists():
        summary["metrics"] = _split_metrics(evaluation)
        summary["blessed"] = is_blessed(output / "evaluator" / "blessing")
    if blessing is not None:
        summary["blessing"] = {key: blessing[key] for key in ("failed", "thresholds", "baseline")}
    cross_validation = output / "cross_validation" / "evaluation"
    if (cross_validation / METRICS_FILE).exists():
        summary["metrics"] = _split_metrics(cross_validation)
        summary["metrics"]["folds"] = [
            {"fold": int(folder.parent.name.removeprefix("fold-")), **_split_metrics(folder)}
            for folder in sorted((output / "evaluator").glob("fold-*/evaluation"), key=lambda path: int(path.parent.name.removeprefix("fold-")))
        ]
    exports_dir = output / "exporter" / "exports"
    if (exports_dir / EXPORTS_FILE).exists():
        exports = read_exports(exports_dir)
        for entry in exports.values():  # written under kfp.local's pipeline root, since moved here
            if "path" in entry:  # a skipped export has none
                entry["path"] = str(exports_dir / Path(entry["path"]).name)
        summary["exports"] = exports
    training_file = output / "trainer" / "model_run" / TRAINING_FILE
    if training_file.exists():
        summary["training"] = read_json(training_file)
    push_file = output / "pusher" / "pushed" / PUSH_FILE
    if push_file.exists():
        summary["push"] = read_json(push_file)
    return summary
