"""One worker of a launched multi-worker job, and the contract every launch backend shares.

`python -m segflow.cluster.workers worker --entry module:function --arguments JSON` is what
each worker process or pod runs (`worker_command`): it calls the entry with the arguments and
writes the JSON-able result to its private scratch folder (`SEGFLOW_WORKER_SCRATCH`), which
the backend reads back in index order (`read_results`). The backends themselves are
segflow.cluster.launcher (local processes) and segflow.cluster.k8s_launcher (pods).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segflow.train.distribute import parse_tf_config, task_index

SCRATCH_ENV = "SEGFLOW_WORKER_SCRATCH"


INDEX_ENV = "SEGFLOW_WORKER_INDEX"


PARENT_ENV = "SEGFLOW_LAUNCHER_PID"


RESULT_FILE = "result.json"


TAIL_LINES = 30


class WorkerFailed(RuntimeError):
    """A worker exited with an error, was killed, or the launch timed out."""


@dataclass
class LaunchRequest:
    name: str  # what is launched, for messages ("trainer")
    entry: str  # "module:function" every worker calls
    arguments: dict[str, Any]  # JSON-able keyword arguments of the entry (the same for all)
    workers: int
    timeout_seconds: float
    workdir: Path  # the local backend's launch folder goes here (and is removed)
    env: dict[str, str] = field(default_factory=dict)  # extra environment of every worker
    config_json: str = ""  # the experiment (ExperimentConfig.to_json): the cluster backends build their pods from it
    run_id: str = ""  # names the cluster backends' objects; the same id finds a retried launch's backup


def worker_command(request: LaunchRequest, python: str = sys.executable) -> list[str]:
    return [python, "-m", "segflow.cluster.workers", "worker", "--entry", request.entry, "--arguments", json.dumps(request.arguments)]


def read_results(root: Path, workers: int) -> list[dict[str, Any]]:
    """Each worker's `result.json` under `root/worker-<index>/` ({} for one that wrote none)."""
    results = []
    for index in range(workers):
        path = root / f"worker-{index}" / RESULT_FILE
        results.append(json.loads(path.read_text()) if path.exists() else {})
    return results


def worker_scratch() -> Path | None:
    """This worker's private temporary folder (None outside a launched worker). In a pod the
    variable holds `{index}`, filled in from TF_CONFIG (chief 0, then the workers)."""
    value = os.environ.get(SCRATCH_ENV)
    if not value:
        return None
    scratch = Path(value.replace("{index}", str(task_index(parse_tf_config(os.environ.get("TF_CONFIG"))))))
    scratch.mkdir(parents=True, exist_ok=True)
    return scratch


def _exit_with_parent(parent: int) -> None:
    """Stop this worker if its launcher dies (it would otherwise wait in a collective forever)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                print("launcher process is gone; worker exits", file=sys.stderr, flush=True)
                os._exit(70)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="launcher-watch").start()


def run_worker(entry: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Call `module:function` with the arguments; its result goes to the scratch folder."""
    module_name, _, function_name = entry.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(**arguments) or {}
    scratch = worker_scratch()
    if scratch is not None:
        (scratch / RESULT_FILE).write_text(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segflow.cluster.workers", description="one worker of a launched multi-worker job")
    commands = parser.add_subparsers(dest="command", required=True)
    # In an Indexed Job pod `python3 -m segflow.cluster.k8s_objects exec` sets TF_CONFIG before this runs.
    worker = commands.add_parser("worker", help="run one worker (TF_CONFIG from the environment)")
    worker.add_argument("--entry", required=True, help="module:function every worker calls")
    worker.add_argument("--arguments", default="{}", help="JSON object of keyword arguments")
    args = parser.parse_args(argv)
    if os.environ.get(PARENT_ENV):
        _exit_with_parent(int(os.environ[PARENT_ENV]))
    # Stopped by the launcher: unwind (atomic writes remove their temporary folders) when the
    # interpreter gets control; a worker stuck in a collective op gets SIGKILL after a grace period.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    run_worker(args.entry, json.loads(args.arguments))
    return 0


if __name__ == "__main__":  # `-m segflow.cluster.workers` imported segflow first: TF_USE_LEGACY_KERAS is set
    sys.exit(main())
