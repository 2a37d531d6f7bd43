"""Launch N training workers that form one MultiWorkerMirroredStrategy cluster.

The trainer core describes the job once (`LaunchRequest`: an entry point `module:function`
that every worker calls with the same JSON keyword arguments, the worker count and a
timeout) and hands it to a backend:

- `local` (here): N processes on this machine, `python -m segflow.cluster.workers worker ...`,
  each with TF_CONFIG naming free localhost ports. The launcher waits, streams the chief's
  output with a `[worker 0]` prefix, and when a worker fails or the timeout passes it stops
  the others and raises `WorkerFailed` naming the worker, its exit code and its last lines.
  Processes and the launch folder are always cleaned up.
- Kubernetes (`indexed_job`, `tfjob`; segflow/cluster/k8s_launcher.py): an Indexed Job plus a
  headless Service, or a Kubeflow TFJob, whose pods run the same command (`worker_command`)
  with the same contract: wait, stream the chief's log, fail naming the worker, clean up.
  There `workdir` must be on storage every pod mounts (the PVC).

A worker's entry returns a JSON-able dict (written to its scratch folder as `result.json`);
the launcher returns these, one per worker, in index order. Each worker has a private
scratch folder (`SEGFLOW_WORKER_SCRATCH`, `<workdir>/worker-{index}` where a pod learns its
index only from TF_CONFIG) for what only the chief may keep: TensorFlow's multi-worker
guide has the other workers write to temporary paths and remove them.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from segflow.cluster.workers import (
    INDEX_ENV,
    PARENT_ENV,
    SCRATCH_ENV,
    TAIL_LINES,
    LaunchRequest,
    WorkerFailed,
    read_results,
    worker_command,
)
from segflow.train.distribute import tf_config
from segflow.utils.runtime import log

STOP_GRACE_SECONDS = 5.0


def backend_name(launcher: str, environ: Mapping[str, str] | None = None) -> str:
    """`trainer.launcher` resolved: auto is local outside Kubernetes, an Indexed Job inside a pod."""
    environ = os.environ if environ is None else environ
    if launcher != "auto":
        return launcher
    return "indexed_job" if environ.get("KUBERNETES_SERVICE_HOST") else "local"


def launch(request: LaunchRequest, launcher: str = "auto", environ: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Run the request on the backend `launcher` names; the workers' results in index order."""
    name = backend_name(launcher, environ)
    if name not in BACKENDS:
        raise WorkerFailed(
            f"trainer.launcher {launcher!r} resolves to the {name!r} backend, which this installation does not have "
            f"(available: {', '.join(sorted(BACKENDS))}); outside Kubernetes use trainer.launcher: local"
        )
    return BACKENDS[name](request)


def free_ports(count: int) -> list[int]:
    """Ports the kernel reports free on localhost (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("localhost", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# ---------------------------------------------------------------- local backend


class _Worker:
    """One local worker process and a thread draining its output (the chief's is printed)."""

    def __init__(self, index: int, command: list[str], env: dict[str, str], scratch: Path, stream: bool) -> None:
        self.index, self.scratch = index, scratch
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True, errors="replace"
        )
        self.reader = threading.Thread(target=self._drain, args=(stream,), daemon=True, name=f"worker-{index}-output")
        self.reader.start()

    def _drain(self, stream: bool) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.tail.append(line)
            if stream:
                print(f"[worker {self.index}] {line}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """SIGTERM to the worker's process group, SIGKILL after a grace period; reaped."""
        if self.process.poll() is None:
            for sig, wait in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, None)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:  # it exited; make sure nothing it started in its session outlives it
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.process.wait()
        self.reader.join(timeout=5)

    def describe_exit(self) -> str:
        code = self.process.returncode
        if code is not None and code < 0:
            try:
                return f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def last_lines(self) -> str:
        lines = list(self.tail)
        return "\n".join(f"    {line}" for line in lines) if lines else "    (no output)"


def launch_local(request: LaunchRequest) -> list[dict[str, Any]]:
    """N worker processes on this machine with TF_CONFIG on localhost ports (see the module
    docstring). Raises WorkerFailed naming the first worker that failed, or on timeout."""
    if request.workers < 1:
        raise ValueError(f"workers must be at least 1, got {request.workers}")
    request.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f".launch-{request.name}-", dir=request.workdir))
    workers: list[_Worker] = []
    try:
        _start_workers(request, root, workers)
        _wait_for(workers, request)
        for worker in workers:
            worker.reader.join(timeout=5)
        results = read_results(root, request.workers)
        log(f"{request.name}: all {request.workers} workers finished")
        return results
    finally:
        for worker in workers:
            worker.stop()
        shutil.rmtree(root, ignore_errors=True)


def _start_workers(request: LaunchRequest, root: Path, workers: list[_Worker]) -> None:
    """Start the workers into `workers` (filled as they start, so the caller stops every one)."""
    hosts = [f"localhost:{port}" for port in free_ports(request.workers)]
    command = worker_command(request)
    log(f"{request.name}: launching {request.workers} local workers ({', '.join(hosts)}); worker 0 is the chief")
    for index in range(request.workers):
        scratch = root / f"worker-{index}"
        scratch.mkdir()
        env = {
            **os.environ,
            **request.env,
            "TF_CONFIG": json.dumps(tf_config({"worker": hosts}, index)),
            INDEX_ENV: str(index),
            SCRATCH_ENV: str(scratch),
            PARENT_ENV: str(os.getpid()),
            "PYTHONUNBUFFERED": "1",
        }
        workers.append(_Worker(index, command, env, scratch, stream=index == 0))


def _wait_for(workers: list[_Worker], request: LaunchRequest) -> None:
    """Return when every worker exited 0; raise WorkerFailed when one fails or time runs out."""
    deadline = time.monotonic() + request.timeout_seconds
    while True:
        failed = [worker for worker in workers if worker.process.poll() not in (None, 0)]
        if failed:
            # The first to fail is the cause; the others then fail in their collectives.
            # Seen in the same poll: a killed worker before one that exited with an error.
            first = min(failed, key=lambda worker: (worker.process.returncode >= 0, worker.index))
            for worker in workers:
                if worker is not first:
                    worker.stop()
            first.reader.join(timeout=5)
            raise WorkerFailed(
                f"{request.name}: worker {first.index} of {request.workers} (pid {first.process.pid}) {first.describe_exit()}; "
                f"the other workers were stopped. Last lines of worker {first.index}:\n{first.last_lines()}"
            )
        if all(worker.process.poll() == 0 for worker in workers):
            return
        if time.monotonic() > deadline:
            running = [str(worker.index) for worker in workers if worker.process.poll() is None]
            chief = workers[0]
            for worker in workers:
                worker.stop()
            raise WorkerFailed(
                f"{request.name}: timed out after {request.timeout_seconds:g} s (trainer.timeout_seconds) with worker(s) "
                f"{', '.join(running)} still running; all workers were stopped. Last lines of worker 0:\n{chief.last_lines()}"
            )
        time.sleep(0.2)


def _launch_indexed_job(request: LaunchRequest) -> list[dict[str, Any]]:
    from segflow.cluster.k8s_launcher import (
        launch_on_kubernetes,  # the kubernetes client only where it is used
    )

    return launch_on_kubernetes(request, "indexed_job")


def _launch_tfjob(request: LaunchRequest) -> list[dict[str, Any]]:
    from segflow.cluster.k8s_launcher import launch_on_kubernetes

    return launch_on_kubernetes(request, "tfjob")


BACKENDS: dict[str, Callable[[LaunchRequest], list[dict[str, Any]]]] = {
    "local": launch_local,
    "indexed_job": _launch_indexed_job,
    "tfjob": _launch_tfjob,
}
