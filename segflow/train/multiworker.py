"""The trainer's multi-worker checks, moved out of the trainer core: every worker's final-weights
digest, the check that the workers agree (`model_run/workers.json`), and the fault injection
the tests use to kill a worker mid-run. Launching the workers is segflow.cluster's (the
trainer core calls it: segflow.train sits below segflow.cluster and cannot).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import tf_keras as keras

from segflow.train.distribute import Plan
from segflow.utils.io import write_json
from segflow.utils.runtime import log

WORKERS_FILE = "workers.json"  # in model_run/ after a multi-worker run: each worker's result
# Fault injection for tests: "<worker index>:<epoch>" makes that worker (0 alone) SIGKILL itself after that epoch.
KILL_WORKER_ENV = "SEGFLOW_FAULT_KILL_WORKER"


def weights_digest(weights: list[np.ndarray]) -> str:
    """sha256 of the weights' dtypes, shapes and bytes: equal on every worker that trained the same model."""
    digest = hashlib.sha256()
    for array in weights:
        digest.update(json.dumps([str(array.dtype), list(array.shape)]).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def agreed_final(results: list[dict[str, Any]], model_run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The chief's final metrics, once every worker's final weights are the same and there is
    one chief; writes each worker's result (without its metrics) to `workers.json` in model_run/."""
    digests = {result.get("weights_sha256") for result in results}
    if len(digests) != 1 or None in digests:
        raise RuntimeError(f"trainer: the workers' final weights differ (sha256 per worker: {[r.get('weights_sha256') for r in results]})")
    chiefs = [result for result in results if result.get("chief")]
    if len(chiefs) != 1:
        raise RuntimeError(f"trainer: expected one chief among the workers, got {len(chiefs)}")
    write_json(Path(model_run_dir) / WORKERS_FILE, {"workers": [{key: value for key, value in r.items() if key != "final"} for r in results]})
    log(f"trainer: {len(results)} workers agree on the final weights (sha256 {digests.pop()[:12]}...)")
    return chiefs[0]["final"]


class KillAfterEpoch(keras.callbacks.Callback):
    """Fault injection (KILL_WORKER_ENV): this worker kills itself as a crashed node would."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if epoch + 1 >= self.epoch:
            log(f"trainer: {KILL_WORKER_ENV}: killing this worker after epoch {epoch + 1}")
            time.sleep(1.0)  # the line reaches the console through this process's own relay thread (segflow.utils.runtime), which the kill stops
            os.kill(os.getpid(), signal.SIGKILL)


def fault_callbacks(plan: Plan) -> list[keras.callbacks.Callback]:
    """The KILL_WORKER_ENV callback if it names this worker, else none."""
    value = os.environ.get(KILL_WORKER_ENV)
    if not value:
        return []
    index, _, epoch = value.partition(":")
    return [KillAfterEpoch(int(epoch or 1))] if int(index) == plan.index else []
