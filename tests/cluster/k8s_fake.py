"""A local fake of the Kubernetes API for the launcher's cluster backends.

It serves, over real HTTP, the endpoints `segflow.cluster.k8s_launcher` calls through the official
`kubernetes` client (Services, batch/v1 Jobs, kubeflow.org/v1 TFJobs, pods, pod logs,
deletes), and a small "kubelet" that runs every pod's container command as a local process:
with the pod's plain `env` entries, its `workingDir`, the completion index of an Indexed
Job (JOB_COMPLETION_INDEX) or the TF_CONFIG the training operator would write for a TFJob.

What it stands in for, and how:
- images: the command runs with this interpreter's folder first on PATH (so `python3` is
  the test venv's), as a container's PATH finds its own python;
- cluster DNS: the worker addresses `<job>-<index>.<service>:2222` in SEGFLOW_TF_CLUSTER
  (and the TFJob's replica addresses) become free localhost ports;
- the Job controller: a failed pod counts against `backoffLimit` (then the Job fails and
  its other pods are killed) or is replaced; the Job completes when every index has
  succeeded; `activeDeadlineSeconds` fails it. A TFJob fails at its first failed pod and
  succeeds when all replicas have (successPolicy AllWorkers).
- `schedulable=False` leaves pods Pending with an Unschedulable condition, as a GPU pod
  waits on a cluster without GPU nodes.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from segflow.cluster.k8s_launcher import COMPLETION_INDEX, REPLICA_INDEX, REPLICA_TYPE
from segflow.cluster.k8s_objects import CLUSTER_ENV, INDEX_ENV

TOKEN = "fake-token"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class FakePod:
    body: dict[str, Any]
    owner: tuple[str, str]  # (kind, name) of its Job or TFJob
    worker_key: str  # the completion index, or "chief-0" / "worker-<i>"
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]


class FakeKubernetes:
    """The API server plus kubelet. Use as a context manager; `kubeconfig()` points the
    client at it; `requests` records (method, path) of every call."""

    def __init__(self, root: Path, schedulable: bool = True) -> None:
        self.root, self.schedulable = root, schedulable
        self.root.mkdir(parents=True, exist_ok=True)
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}  # (kind, name) -> object
        self.pods: dict[str, FakePod] = {}
        self.requests: list[tuple[str, str]] = []
        self.unauthorized = 0
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._counter = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.threads = [threading.Thread(target=self.server.serve_forever, daemon=True), threading.Thread(target=self._kubelet, daemon=True)]

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> FakeKubernetes:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            for pod in self.pods.values():
                self._kill(pod)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, namespace: str = "segflow") -> Path:
        path = self.root / "kubeconfig"
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": TOKEN}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
                    "current-context": "fake",
                }
            )
        )
        return path

    def running_processes(self) -> list[int]:
        with self.lock:
            return [pod.process.pid for pod in self.pods.values() if pod.process is not None and pod.process.poll() is None]

    # ------------------------------------------------------------------ HTTP

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _reply(self, status: int, payload: Any, text: bool = False) -> None:
                data = payload.encode() if text else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if text else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _serve(self, method: str) -> None:
                parsed = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parsed.query))
                fake.requests.append((method, parsed.path))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    fake.unauthorized += 1
                    return self._reply(401, {"kind": "Status", "code": 401, "reason": "Unauthorized"})
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                status, payload, text = fake.route(method, parsed.path, query, body)
                self._reply(status, payload, text)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_DELETE(self) -> None:
                self._serve("DELETE")

        return Handler

    def route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, bool]:
        routes = [
            (r"/api/v1/namespaces/[^/]+/services", "Service"),
            (r"/apis/batch/v1/namespaces/[^/]+/jobs", "Job"),
            (r"/apis/kubeflow.org/v1/namespaces/[^/]+/tfjobs", "TFJob"),
        ]
        with self.lock:
            for pattern, kind in routes:
                if method == "POST" and re.fullmatch(pattern, path):
                    return self._create(kind, body)
                match = re.fullmatch(pattern + r"/([^/]+)(/status)?", path)
                if match and method == "GET":
                    found = self.objects.get((kind, match.group(1)))
                    return (200, self._public(found), False) if found else self._missing(kind, match.group(1))
                if match and method == "DELETE":
                    return self._delete(kind, match.group(1))
            if re.fullmatch(r"/api/v1/namespaces/[^/]+/pods", path):
                selected = [pod for pod in self.pods.values() if self._selected(pod, query.get("labelSelector", ""))]
                if method == "GET":
                    return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [pod.body for pod in selected]}, False
                if method == "DELETE":
                    for pod in selected:
                        self._remove_pod(pod)
                    return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": []}, False
            match = re.fullmatch(r"/api/v1/namespaces/[^/]+/pods/([^/]+)", path)
            if match and method == "DELETE":
                pod = self.pods.get(match.group(1))
                if pod is None:
                    return self._missing("Pod", match.group(1))
                self._remove_pod(pod)
                return 200, pod.body, False
            match = re.fullmatch(r"/api/v1/namespaces/[^/]+/pods/([^/]+)/log", path)
            if match and method == "GET":
                pod = self.pods.get(match.group(1))
                if pod is None or not pod.log_path.exists():
                    return self._missing("Pod", match.group(1))
                lines = pod.log_path.read_text(errors="replace").splitlines(keepends=True)
                if "tailLines" in query:
                    lines = lines[-int(query["tailLines"]) :]
                return 200, "".join(lines), True
        return 404, {"kind": "Status", "code": 404, "reason": "NotFound", "message": f"{method} {path} is not served by the fake"}, False

    @staticmethod
    def _missing(kind: str, name: str) -> tuple[int, Any, bool]:
        return 404, {"kind": "Status", "apiVersion": "v1", "code": 404, "reason": "NotFound", "message": f'{kind.lower()}s "{name}" not found'}, False

    @staticmethod
    def _public(stored: dict[str, Any]) -> dict[str, Any]:
        """The object as the API returns it (without the fake's bookkeeping keys)."""
        return {key: value for key, value in stored.items() if not key.startswith("_")}

    @staticmethod
    def _selected(pod: FakePod, selector: str) -> bool:
        labels = pod.body["metadata"].get("labels") or {}
        wanted = dict(part.split("=", 1) for part in selector.split(",") if part)
        return all(labels.get(key) == value for key, value in wanted.items())

    # ------------------------------------------------------------------ objects

    def _create(self, kind: str, body: dict[str, Any]) -> tuple[int, Any, bool]:
        name = body["metadata"]["name"]
        if (kind, name) in self.objects:
            return 409, {"kind": "Status", "code": 409, "reason": "AlreadyExists"}, False
        stored = json.loads(json.dumps(body))
        stored["metadata"]["creationTimestamp"] = _now()
        stored["metadata"]["uid"] = f"uid-{len(self.objects)}"
        stored["status"] = {}
        stored["_created"] = time.monotonic()
        self.objects[(kind, name)] = stored
        if kind == "Job":
            stored["status"] = {"active": 0, "succeeded": 0, "failed": 0}
            for index in range(stored["spec"]["completions"]):
                self._start_pod(stored, kind, str(index))
        elif kind == "TFJob":
            replicas = stored["spec"]["tfReplicaSpecs"]
            stored["_ports"] = {role: [_free_port() for _ in range(spec["replicas"])] for role, spec in replicas.items()}
            for role, spec in replicas.items():
                for index in range(spec["replicas"]):
                    self._start_pod(stored, kind, f"{role.lower()}-{index}")
        return 201, self._public(stored), False

    def _delete(self, kind: str, name: str) -> tuple[int, Any, bool]:
        found = self.objects.pop((kind, name), None)
        if found is None:
            return self._missing(kind, name)
        for pod in [pod for pod in self.pods.values() if pod.owner == (kind, name)]:
            self._remove_pod(pod)
        return 200, {"kind": "Status", "status": "Success"}, False

    def _start_pod(self, owner: dict[str, Any], kind: str, key: str) -> None:
        self._counter += 1
        owner_name = owner["metadata"]["name"]
        if kind == "Job":
            template = owner["spec"]["template"]
            name = f"{owner_name}-{key}-{self._counter:05d}"
            extra_labels = {"job-name": owner_name, COMPLETION_INDEX: key}
            annotations = {COMPLETION_INDEX: key}
        else:
            role, index = key.split("-")
            template = owner["spec"]["tfReplicaSpecs"][role.capitalize()]["template"]
            name = f"{owner_name}-{key}"
            extra_labels = {REPLICA_TYPE: role, REPLICA_INDEX: index, "training.kubeflow.org/job-name": owner_name}
            annotations = {}
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": owner["metadata"].get("namespace", "default"),
                "labels": {**(template.get("metadata") or {}).get("labels", {}), **extra_labels},
                "annotations": annotations,
                "creationTimestamp": _now(),
            },
            "spec": json.loads(json.dumps(template["spec"])),
            "status": {"phase": "Pending"},
        }
        pod = FakePod(body, (kind, owner_name), key, self.root / f"{name}.log")
        self.pods[name] = pod
        if not self.schedulable:
            body["status"]["conditions"] = [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}
            ]
            return
        container = body["spec"]["containers"][0]
        env = {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOSTNAME": name,
            "PYTHONUNBUFFERED": "1",
        }
        env.update({item["name"]: item["value"] for item in container.get("env", []) if "value" in item})
        if kind == "Job":
            env[INDEX_ENV] = key
            if CLUSTER_ENV in env:  # the fake's DNS: the pods' stable names become localhost ports
                cluster = json.loads(env[CLUSTER_ENV])
                owner.setdefault("_ports", [_free_port() for _ in cluster["worker"]])
                env[CLUSTER_ENV] = json.dumps({"worker": [f"localhost:{port}" for port in owner["_ports"]]})
        else:
            ports = owner["_ports"]
            cluster = {role.lower(): [f"localhost:{port}" for port in role_ports] for role, role_ports in ports.items()}
            env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": role, "index": int(index)}})
        workdir = container.get("workingDir")
        with open(pod.log_path, "wb") as log:
            pod.process = subprocess.Popen(
                container["command"] + list(container.get("args", [])),
                env=env,
                cwd=workdir if workdir and Path(workdir).is_dir() else self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        body["status"] = {"phase": "Running", "containerStatuses": [{"name": container["name"], "state": {"running": {"startedAt": _now()}}}]}

    @staticmethod
    def _kill(pod: FakePod) -> None:
        if pod.process is not None and pod.process.poll() is None:
            try:
                os.killpg(pod.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            pod.process.wait()

    def _remove_pod(self, pod: FakePod) -> None:
        self._kill(pod)
        self.pods.pop(pod.name, None)

    # ------------------------------------------------------------------ kubelet and controllers

    def _kubelet(self) -> None:
        while not self._stop.wait(0.1):
            with self.lock:
                for pod in list(self.pods.values()):
                    if pod.process is not None and pod.body["status"]["phase"] == "Running" and pod.process.poll() is not None:
                        self._finish(pod, pod.process.returncode)
                for (kind, _), owner in list(self.objects.items()):
                    if kind in ("Job", "TFJob"):
                        self._reconcile(kind, owner)

    def _finish(self, pod: FakePod, code: int) -> None:
        exit_code = 128 - code if code < 0 else code
        reason = "Completed" if code == 0 else ("Error" if code > 0 else f"Signal {-code}")
        pod.body["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
        container = pod.body["spec"]["containers"][0]["name"]
        pod.body["status"]["containerStatuses"] = [{"name": container, "state": {"terminated": {"exitCode": exit_code, "reason": reason, "finishedAt": _now()}}}]

    def _condition(self, owner: dict[str, Any], kind: str, reason: str, message: str) -> None:
        owner["status"].setdefault("conditions", []).append({"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": _now()})

    def _reconcile(self, kind: str, owner: dict[str, Any]) -> None:
        status = owner["status"]
        if any(condition["type"] in ("Complete", "Failed", "Succeeded") for condition in status.get("conditions", [])):
            return
        name = owner["metadata"]["name"]
        pods = [pod for pod in self.pods.values() if pod.owner == (kind, name)]
        failed = [pod for pod in pods if pod.body["status"]["phase"] == "Failed"]
        deadline = (owner["spec"].get("runPolicy") or owner["spec"]).get("activeDeadlineSeconds")
        if deadline is not None and time.monotonic() - owner["_created"] > deadline:
            self._condition(owner, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
            for pod in pods:
                self._kill(pod)
            return
        if kind == "Job":
            counted = owner.setdefault("_counted", set())
            for pod in failed:
                if pod.name not in counted:
                    counted.add(pod.name)
                    status["failed"] += 1
                    if status["failed"] <= owner["spec"].get("backoffLimit", 6):
                        self._start_pod(owner, kind, pod.worker_key)
            if status["failed"] > owner["spec"].get("backoffLimit", 6):
                self._condition(owner, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
                for pod in pods:
                    self._kill(pod)
                return
            done = {pod.worker_key for pod in pods if pod.body["status"]["phase"] == "Succeeded"}
            status["succeeded"] = len(done)
            status["active"] = sum(pod.body["status"]["phase"] == "Running" for pod in pods)
            if len(done) == owner["spec"]["completions"]:
                self._condition(owner, "Complete", "", "")
        else:
            if failed:
                self._condition(owner, "Failed", "TFJobFailed", f"TFJob {name} has failed because 1 {failed[0].worker_key.split('-')[0].capitalize()} replica(s) failed.")
                for pod in pods:
                    self._kill(pod)
                return
            expected = sum(spec["replicas"] for spec in owner["spec"]["tfReplicaSpecs"].values())
            if sum(pod.body["status"]["phase"] == "Succeeded" for pod in pods) == expected:
                self._condition(owner, "Succeeded", "TFJobSucceeded", f"TFJob {name} successfully completed.")
