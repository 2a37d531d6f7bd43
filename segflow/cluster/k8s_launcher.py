"""The Kubernetes backends of the multi-worker launcher (`trainer.launcher: indexed_job | tfjob`).

`launch_on_kubernetes` creates the objects segflow/cluster/k8s_objects.py describes (a headless
Service and an Indexed Job, or a Kubeflow TFJob) with the official `kubernetes` client, then
polls until the Job (or TFJob) succeeds or fails, printing the chief pod's new log lines
with a `[worker 0]` prefix as the local backend does. A failure names the worker (its
completion index, or the TFJob replica), its pod, how its container ended and its last log
lines; a timeout names the workers still running or pending and why they are pending (an
unschedulable GPU pod says so). Whatever happens, the Job or TFJob (with its pods) and the
Service are deleted.

The workers' results travel through `request.workdir`, which must be on storage that the
launcher's pod and every worker pod mount (the PVC of `kubernetes.pvc`): each worker writes
`worker-<index>/result.json` there, as under the local backend.

The client configuration is the pod's service account inside a cluster, else the current
kubeconfig context (`KUBECONFIG`), so the same code runs in a KFP step and from a laptop.
The service account needs the Role in k8s/base/rbac.yaml.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from segflow.cluster.k8s_objects import JOB_LABEL, job_name, launch_objects
from segflow.cluster.workers import (
    SCRATCH_ENV,
    TAIL_LINES,
    LaunchRequest,
    WorkerFailed,
    read_results,
    worker_command,
)
from segflow.config.experiment import ExperimentConfig
from segflow.utils.runtime import log

POLL_SECONDS = 2.0
REQUEST_TIMEOUT = 60  # seconds per API call: a hung API server fails the launch instead of hanging it
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # pod annotation (and label since 1.28)
REPLICA_TYPE = "training.kubeflow.org/replica-type"  # pod labels the training operator sets
REPLICA_INDEX = "training.kubeflow.org/replica-index"
TFJOB_GROUP, TFJOB_VERSION, TFJOB_PLURAL = "kubeflow.org", "v1", "tfjobs"


def api_client() -> Any:
    """A client for the cluster this runs in, or for the kubeconfig's current context."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:  # KUBECONFIG read now: the client's default location is fixed when it is imported
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        except (config.ConfigException, OSError) as error:
            raise WorkerFailed(
                f"trainer.launcher needs a Kubernetes cluster: not inside a pod with a service account, and no usable kubeconfig ({error}); "
                "outside Kubernetes use trainer.launcher: local"
            ) from None
    return client.ApiClient()


@dataclass
class _Pod:
    """What the launcher needs of a worker pod (read from the API's JSON)."""

    name: str
    worker: int  # 0 is the chief
    phase: str
    exit_code: int | None
    reason: str  # why the container ended, or why the pod is pending
    created: str
    finished: str  # when its container ended ("" while it runs)

    def describe(self) -> str:
        if self.phase == "Failed":
            code = f"exit code {self.exit_code}" if self.exit_code is not None else "no exit code"
            return f"failed ({code}{', ' + self.reason if self.reason else ''})"
        return self.phase.lower() + (f" ({self.reason})" if self.reason else "")


def _worker_of(pod: dict[str, Any]) -> int | None:
    """The pod's worker index: the Indexed Job's completion index, or chief 0 then the TFJob's workers."""
    metadata = pod.get("metadata") or {}
    labels, annotations = metadata.get("labels") or {}, metadata.get("annotations") or {}
    index = annotations.get(COMPLETION_INDEX, labels.get(COMPLETION_INDEX))
    if index is not None:
        return int(index)
    kind = str(labels.get(REPLICA_TYPE, "")).lower()
    if kind == "chief":
        return 0
    if kind == "worker":
        return int(labels.get(REPLICA_INDEX, 0)) + 1
    return None


def _pod(pod: dict[str, Any]) -> _Pod | None:
    worker = _worker_of(pod)
    if worker is None:
        return None
    status = pod.get("status") or {}
    exit_code, reason, finished = None, "", ""
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            exit_code, reason, finished = terminated.get("exitCode"), terminated.get("reason") or "", terminated.get("finishedAt") or ""
        waiting = (container.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason"):
            reason = f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            reason = f"{condition.get('reason', 'unscheduled')}: {condition.get('message', '')}".rstrip(": ")
    metadata = pod.get("metadata") or {}
    return _Pod(metadata["name"], worker, status.get("phase", "Pending"), exit_code, reason, metadata.get("creationTimestamp", ""), finished)


class _Cluster:
    """The launch's objects in one namespace, read and deleted as plain JSON dicts."""

    def __init__(self, api: Any, namespace: str, name: str, kind: str) -> None:
        from kubernetes import client

        self.core, self.batch, self.custom = client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)
        self.namespace, self.name, self.kind = namespace, name, kind

    def create(self, body: dict[str, Any]) -> None:
        kind = body["kind"]
        if kind == "Service":
            self.core.create_namespaced_service(self.namespace, body, _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
        elif kind == "Job":
            self.batch.create_namespaced_job(self.namespace, body, _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
        elif kind == "TFJob":
            self.custom.create_namespaced_custom_object(TFJOB_GROUP, TFJOB_VERSION, self.namespace, TFJOB_PLURAL, body, _request_timeout=REQUEST_TIMEOUT)
        else:
            raise ValueError(f"the launcher does not create {kind} objects")

    def pods(self, all_retries: bool = False) -> list[_Pod]:
        """The workers' pods: the newest per worker (a retried index has several), or all."""
        response = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOB_LABEL}={self.name}", _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
        found = [pod for pod in map(_pod, json.loads(response.data).get("items", [])) if pod is not None]
        if all_retries:
            return found
        newest: dict[int, _Pod] = {}
        for pod in found:
            if pod.worker not in newest or pod.created >= newest[pod.worker].created:
                newest[pod.worker] = pod
        return [newest[index] for index in sorted(newest)]

    def outcome(self) -> tuple[str, str] | None:
        """("succeeded" | "failed", reason) once the Job or TFJob has finished, else None."""
        if self.kind == "tfjob":
            status = self.custom.get_namespaced_custom_object(TFJOB_GROUP, TFJOB_VERSION, self.namespace, TFJOB_PLURAL, self.name, _request_timeout=REQUEST_TIMEOUT).get("status") or {}
            finished = {"Succeeded": "succeeded", "Failed": "failed"}
        else:
            response = self.batch.read_namespaced_job(self.name, self.namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
            status = json.loads(response.data).get("status") or {}
            finished = {"Complete": "succeeded", "Failed": "failed"}
        for condition in status.get("conditions") or []:
            if condition.get("type") in finished and condition.get("status") == "True":
                reason = ": ".join(part for part in (condition.get("reason"), condition.get("message")) if part)
                return finished[condition["type"]], reason
        return None

    def log(self, pod: str, tail: int | None = None) -> list[str]:
        from kubernetes.client.exceptions import ApiException

        try:
            text = self.core.read_namespaced_pod_log(pod, self.namespace, tail_lines=tail, _preload_content=False, _request_timeout=REQUEST_TIMEOUT).data
        except ApiException:  # not started yet, or already gone
            return []
        return text.decode("utf-8", errors="replace").splitlines()

    def _delete_pods(self) -> None:
        """Pods the Job's deletion has not taken yet (it deletes them in the background)."""
        from kubernetes.client.exceptions import ApiException

        for pod in self.pods(all_retries=True):
            try:
                self.core.delete_namespaced_pod(pod.name, self.namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
            except ApiException as error:
                if error.status != 404:
                    raise

    def delete(self) -> None:
        """The Job or TFJob with its pods, the Service and any pod left; a missing one is fine."""
        from kubernetes.client.exceptions import ApiException

        steps: list[tuple[str, Callable[[], Any]]] = []
        if self.kind == "tfjob":
            steps.append(("TFJob", lambda: self.custom.delete_namespaced_custom_object(TFJOB_GROUP, TFJOB_VERSION, self.namespace, TFJOB_PLURAL, self.name, _request_timeout=REQUEST_TIMEOUT)))
        else:
            steps.append(("Job", lambda: self.batch.delete_namespaced_job(self.name, self.namespace, propagation_policy="Background", _preload_content=False, _request_timeout=REQUEST_TIMEOUT)))
            steps.append(("Service", lambda: self.core.delete_namespaced_service(self.name, self.namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT)))
        steps.append(("pods", self._delete_pods))  # one by one: the Role grants delete, not deletecollection
        for what, step in steps:
            try:
                step()
            except Exception as error:  # cleanup must try every step, whatever the API answers
                if not (isinstance(error, ApiException) and error.status == 404):
                    log(f"launcher: could not delete the {what} of {self.name} in {self.namespace} ({error}); delete it by hand")


def _failure(cluster: _Cluster, request: LaunchRequest, reason: str) -> WorkerFailed:
    failed = [pod for pod in cluster.pods(all_retries=True) if pod.phase == "Failed"]
    if not failed:
        return WorkerFailed(f"{request.name}: the {cluster.kind} {cluster.name} failed ({reason or 'no reason given'}); no worker pod failed by itself")
    # The first to fail is the cause; the controller then stops the others.
    first = min(failed, key=lambda pod: (pod.finished or "~", pod.worker))
    lines = cluster.log(first.name, TAIL_LINES)
    shown = "\n".join(f"    {line}" for line in lines) if lines else "    (no output)"
    return WorkerFailed(
        f"{request.name}: worker {first.worker} of {request.workers} (pod {first.name}) {first.describe()}; "
        f"the {cluster.kind} {cluster.name} failed ({reason}) and was deleted with its pods. Last lines of worker {first.worker}:\n{shown}"
    )


def launch_on_kubernetes(request: LaunchRequest, kind: str, api: Any | None = None, poll_seconds: float = POLL_SECONDS) -> list[dict[str, Any]]:
    """Run the request as an Indexed Job (`kind` indexed_job) or a TFJob (tfjob); the workers'
    results in index order. Raises WorkerFailed naming the failed worker, or on timeout."""
    if not request.config_json or not request.run_id:
        raise ValueError("a Kubernetes launch needs the experiment config and a run id in the LaunchRequest")
    config = ExperimentConfig.from_json(request.config_json)
    name = job_name(config, request.run_id)
    namespace = config.kubernetes.namespace
    env = {**request.env, SCRATCH_ENV: str(request.workdir / "worker-{index}")}
    objects = launch_objects(config, request.run_id, worker_command(request, python="python3"), kind, env)
    cluster = _Cluster(api if api is not None else api_client(), namespace, name, kind)
    printed, chief_pod = 0, ""
    try:
        for body in objects:
            cluster.create(body)
        log(f"{request.name}: created {' and '.join(body['kind'] for body in objects)} {name} in namespace {namespace} ({request.workers} workers; worker 0 is the chief)")
        deadline = time.monotonic() + request.timeout_seconds
        while True:
            pods = cluster.pods()
            chief = next((pod for pod in pods if pod.worker == 0), None)
            if chief is not None and chief.phase != "Pending":
                if chief.name != chief_pod:  # a retried chief starts a new log
                    chief_pod, printed = chief.name, 0
                lines = cluster.log(chief.name)
                for line in lines[printed:]:
                    print(f"[worker 0] {line}", file=sys.stderr, flush=True)
                printed = max(printed, len(lines))
            outcome = cluster.outcome()
            if outcome is not None:
                state, reason = outcome
                if state == "failed":
                    raise _failure(cluster, request, reason)
                break
            if time.monotonic() > deadline:
                waiting = [f"worker {pod.worker} (pod {pod.name}) {pod.describe()}" for pod in pods if pod.phase in ("Pending", "Running")]
                raise WorkerFailed(
                    f"{request.name}: timed out after {request.timeout_seconds:g} s (trainer.timeout_seconds) with "
                    f"{'; '.join(waiting) or 'no worker pod created'}; the {kind} {name} was deleted with its pods"
                )
            time.sleep(poll_seconds)
        results = read_results(request.workdir, request.workers)
        missing = [str(index) for index, result in enumerate(results) if not result]
        if missing:
            raise WorkerFailed(
                f"{request.name}: worker(s) {', '.join(missing)} finished but left no result under {request.workdir}: "
                "that folder must be on storage every pod mounts (kubernetes.pvc)"
            )
        log(f"{request.name}: all {request.workers} workers finished")
        return results
    finally:
        cluster.delete()
