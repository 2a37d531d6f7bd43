"""The launcher's Kubernetes backends (Indexed Job + headless Service, Kubeflow TFJob) through
the official `kubernetes` client, against a local fake of the API over HTTP (tests/cluster/k8s_fake.py)
whose kubelet runs each pod's command as a local process.

Checked: the objects created, TF_CONFIG in every pod, the chief's log streamed, results in
index order, a failed worker named with its exit code and last lines, a timeout naming the
pending workers (an unschedulable GPU pod), and that every object, pod and process is gone
afterwards whatever happened.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from segflow.config.experiment import ExperimentConfig, validate_config
from segflow.cluster.k8s_launcher import launch_on_kubernetes
from segflow.cluster.launcher import launch
from segflow.cluster.workers import LaunchRequest, WorkerFailed, worker_scratch
from tests.conftest import tiny_raw_config
from tests.cluster.k8s_fake import FakeKubernetes

ROOT = Path(__file__).resolve().parents[2]


def report_tf_config(fail_worker: int = -1, code: int = 3, sleep: float = 0.0) -> dict[str, Any]:
    """A worker entry: prints, optionally fails or sleeps, and returns what it saw."""
    tf_config = json.loads(os.environ["TF_CONFIG"])
    from segflow.train.distribute import task_index

    index = task_index(tf_config)
    print(f"hello from worker {index}", flush=True)
    if index == fail_worker:
        print("out of memory in a collective", flush=True)
        sys.exit(code)
    time.sleep(sleep)
    return {"index": index, "tf_config": tf_config, "scratch": str(worker_scratch())}


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubernetes]:
    with FakeKubernetes(tmp_path / "cluster") as cluster:
        monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig()))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield cluster
        assert cluster.unauthorized == 0  # the kubeconfig's token reached every request


def _config(tmp_path: Path, workers: int = 2, retries: int = 0) -> ExperimentConfig:
    kubernetes = {"namespace": "team-a", "pvc": "segflow-artifacts", "pvc_mount_path": str(tmp_path / "pvc"), "retries": retries}
    return validate_config(tiny_raw_config(tmp_path, trainer={"workers": workers}, kubernetes=kubernetes))


def _request(tmp_path: Path, workers: int = 2, timeout: float = 120, retries: int = 0, **arguments: Any) -> LaunchRequest:
    (tmp_path / "pvc").mkdir(exist_ok=True)
    return LaunchRequest(
        name="trainer",
        entry=f"{__name__}:report_tf_config",
        arguments=arguments,
        workers=workers,
        timeout_seconds=timeout,
        workdir=tmp_path / "pvc" / "launch",
        env={"PYTHONPATH": str(ROOT)},
        config_json=_config(tmp_path, workers, retries).to_json(),
        run_id="run-1",
    )


def _assert_cleaned(fake: FakeKubernetes) -> None:
    assert not fake.objects, fake.objects.keys()
    assert not fake.pods and not fake.running_processes()
    _assert_allowed_by_the_launchers_role(fake.requests)


def _rbac_rules() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) that k8s/base/rbac.yaml's Role segflow-launcher grants."""
    documents = yaml.safe_load_all((ROOT / "k8s" / "base" / "rbac.yaml").read_text())
    role = next(doc for doc in documents if doc["kind"] == "Role" and doc["metadata"]["name"] == "segflow-launcher")
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]}


def _assert_allowed_by_the_launchers_role(requests: list[tuple[str, str]]) -> None:
    """Every call the launcher made is one the least-privilege Role allows."""
    rules = _rbac_rules()
    for method, path in requests:
        match = re.fullmatch(r"/(?:api/v1|apis/([^/]+)/[^/]+)/namespaces/[^/]+/([^/]+)(?:/([^/]+))?(?:/([^/]+))?", path)
        assert match, path
        group, resource, name, subresource = match.group(1) or "", match.group(2), match.group(3), match.group(4)
        verb = {"POST": "create", "DELETE": "delete" if name else "deletecollection", "GET": "get" if name else "list"}[method]
        wanted = (group, f"{resource}/{subresource}" if subresource else resource, verb)
        assert wanted in rules, f"{method} {path} needs {wanted}, which k8s/base/rbac.yaml does not grant"


def test_indexed_job_runs_every_worker_streams_the_chief_and_cleans_up(fake: FakeKubernetes, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    results = launch(_request(tmp_path, workers=3), "indexed_job")
    assert [result["index"] for result in results] == [0, 1, 2]
    hosts = results[0]["tf_config"]["cluster"]["worker"]
    assert len(hosts) == 3 and all(result["tf_config"]["cluster"]["worker"] == hosts for result in results)
    assert [result["tf_config"]["task"] for result in results] == [{"type": "worker", "index": i} for i in range(3)]
    assert [Path(result["scratch"]).name for result in results] == ["worker-0", "worker-1", "worker-2"]
    stderr = capfd.readouterr().err
    assert "[worker 0] hello from worker 0" in stderr and "[worker 1]" not in stderr
    created = [(method, path) for method, path in fake.requests if method == "POST"]
    assert created == [("POST", "/api/v1/namespaces/team-a/services"), ("POST", "/apis/batch/v1/namespaces/team-a/jobs")]
    assert ("DELETE", "/apis/batch/v1/namespaces/team-a/jobs/tiny-run-1") in fake.requests
    assert ("DELETE", "/api/v1/namespaces/team-a/services/tiny-run-1") in fake.requests
    _assert_cleaned(fake)


def test_tfjob_gets_the_operators_tf_config_and_cleans_up(fake: FakeKubernetes, tmp_path: Path) -> None:
    results = launch(_request(tmp_path, workers=2), "tfjob")
    assert [result["index"] for result in results] == [0, 1]
    assert [result["tf_config"]["task"] for result in results] == [{"type": "chief", "index": 0}, {"type": "worker", "index": 0}]
    assert set(results[0]["tf_config"]["cluster"]) == {"chief", "worker"}
    assert ("POST", "/apis/kubeflow.org/v1/namespaces/team-a/tfjobs") in fake.requests
    assert ("DELETE", "/apis/kubeflow.org/v1/namespaces/team-a/tfjobs/tiny-run-1") in fake.requests
    _assert_cleaned(fake)


@pytest.mark.parametrize("kind", ["indexed_job", "tfjob"])
def test_a_failed_worker_is_named_with_its_exit_code_and_last_lines(fake: FakeKubernetes, tmp_path: Path, kind: str) -> None:
    request = _request(tmp_path, workers=2, fail_worker=1, code=3, sleep=60)
    with pytest.raises(WorkerFailed) as failure:
        launch(request, kind)
    message = str(failure.value)
    assert "worker 1 of 2 (pod tiny-run-1-" in message and "failed (exit code 3, Error)" in message, message
    assert "out of memory in a collective" in message and "was deleted with its pods" in message
    _assert_cleaned(fake)


def test_a_timeout_names_the_pending_workers_and_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeKubernetes(tmp_path / "cluster", schedulable=False) as fake:
        monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig()))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        with pytest.raises(WorkerFailed) as failure:
            launch_on_kubernetes(_request(tmp_path, workers=2, timeout=1), "indexed_job", poll_seconds=0.2)
        message = str(failure.value)
        assert "timed out after 1 s (trainer.timeout_seconds)" in message
        assert "worker 0 (pod tiny-run-1-0-" in message and "worker 1 (pod tiny-run-1-1-" in message
        assert "pending (Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.)" in message
        _assert_cleaned(fake)


def test_a_running_timeout_stops_the_workers(fake: FakeKubernetes, tmp_path: Path) -> None:
    with pytest.raises(WorkerFailed, match=r"timed out after 3 s .*worker 0 \(pod tiny-run-1-0-\d+\) running"):
        launch_on_kubernetes(_request(tmp_path, workers=2, timeout=3, sleep=120), "indexed_job", poll_seconds=0.2)
    _assert_cleaned(fake)


def test_a_retried_pod_is_not_a_failure_within_the_backoff_limit(fake: FakeKubernetes, tmp_path: Path) -> None:
    """kubernetes.retries is the Job's backoffLimit: worker 1 fails once, its replacement fails
    too, and only then does the Job (and the launcher) fail, naming the first failure."""
    request = _request(tmp_path, workers=2, retries=1, fail_worker=1, code=5, sleep=60)
    with pytest.raises(WorkerFailed, match="BackoffLimitExceeded") as failure:
        launch(request, "indexed_job")
    assert "worker 1 of 2" in str(failure.value) and "exit code 5" in str(failure.value)
    assert sum(1 for method, path in fake.requests if method == "POST") == 2  # the Job controller made the replacement
    _assert_cleaned(fake)


def test_without_a_cluster_the_error_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(WorkerFailed, match="outside Kubernetes use trainer.launcher: local"):
        launch(_request(tmp_path), "indexed_job")
