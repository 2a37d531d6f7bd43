"""Kubernetes objects of a multi-worker training run, as plain dicts (no client, no cluster).

The multi-worker launcher (`trainer.workers` > 1 inside a cluster) creates either

- an Indexed Job of N pods plus a headless Service (no operator needed): Kubernetes gives
  each pod its completion index in `JOB_COMPLETION_INDEX` and, because the pod template names
  the Service as its `subdomain`, the stable DNS name `<job>-<index>.<service>`. Every pod
  carries the same list of worker addresses (`SEGFLOW_TF_CLUSTER`), and
  `python3 -m segflow.cluster.k8s_objects exec -- COMMAND...` turns that list and the index into
  `TF_CONFIG` before it execs the worker command; worker 0 is the chief;
- or a Kubeflow TFJob (`trainer.launcher: tfjob`, kubeflow.org/v1; the training operator
  must be installed) with one Chief and N-1 Workers: the operator writes `TF_CONFIG` itself.

Every function here is pure: config and run id in, dicts out, ready for
`kubernetes.client` (`create_namespaced_job(namespace, body=job)`) or `kubectl apply -f`.
All pods meet Pod Security "restricted" and carry `app.kubernetes.io/part-of: segflow`, the
label that k8s/base/networkpolicy.yaml lets talk to each other.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from segflow.config.experiment import ExperimentConfig
from segflow.train.distribute import tf_config

PORT = 2222  # the workers' gRPC port; the training operator's default for TFJob too
PORT_NAME = "tfjob-port"  # the port name the training operator looks for
TFJOB_CONTAINER = "tensorflow"  # the container name the training operator fills in
WORKER_CONTAINER = "worker"
GPU_RESOURCE = "nvidia.com/gpu"  # the accelerator resource when trainer_pool.accelerator_type is unset
CLUSTER_ENV = "SEGFLOW_TF_CLUSTER"  # JSON {"worker": [host:port, ...]} in every Indexed Job pod
INDEX_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes in the pods of an Indexed Job
RUN_USER = 1000  # the image's non-root user (containers/Dockerfile)
WORK_DIR = "/mnt/segflow"  # where kubernetes.pvc is mounted unless kubernetes.pvc_mount_path says otherwise
PART_OF = "app.kubernetes.io/part-of"
JOB_LABEL = "segflow.utils.io/job"
RUN_LABEL = "segflow.utils.io/run-id"
TTL_SECONDS = 3600  # a safety net: the launcher deletes its objects itself
_NAME_LIMIT = 52  # leaves room for "-<index>" in a pod hostname (63) and the controllers' suffixes


def dns_label(text: str, limit: int = 63) -> str:
    """`text` as an RFC 1035 label (lowercase alphanumerics and '-', starting with a letter).
    Longer names are cut and keep a short digest of the whole, so two long names stay distinct."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    label = re.sub(r"-{2,}", "-", label)
    if not label or not label[0].isalpha():
        label = f"sf-{label}".rstrip("-")
    if len(label) > limit:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        label = f"{label[: limit - 9].rstrip('-')}-{digest}"
    return label


def job_name(config: ExperimentConfig, run_id: str) -> str:
    """The name of the Job (or TFJob) and of its headless Service for one training run."""
    return dns_label(f"{config.name}-{run_id}", _NAME_LIMIT)


def labels(config: ExperimentConfig, run_id: str) -> dict[str, str]:
    return {
        PART_OF: "segflow",
        "app.kubernetes.io/name": "segflow-trainer",
        "app.kubernetes.io/component": "worker",
        RUN_LABEL: dns_label(run_id),
        JOB_LABEL: job_name(config, run_id),
    }


def worker_hosts(job: str, service: str, workers: int, port: int = PORT) -> list[str]:
    """`<job>-<index>.<service>:<port>` for index 0..workers-1: the pods' stable DNS names, which
    resolve inside the Service's namespace."""
    return [f"{job}-{index}.{service}:{port}" for index in range(workers)]


def tf_config_from_environment(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """TF_CONFIG of this Indexed Job pod, from SEGFLOW_TF_CLUSTER and JOB_COMPLETION_INDEX."""
    environ = os.environ if environ is None else environ
    missing = [name for name in (CLUSTER_ENV, INDEX_ENV) if name not in environ]
    if missing:
        raise ValueError(f"not an Indexed Job worker pod: {' and '.join(missing)} unset")
    try:
        cluster = json.loads(environ[CLUSTER_ENV])
    except json.JSONDecodeError as error:
        raise ValueError(f"{CLUSTER_ENV} is not valid JSON ({error})") from None
    try:
        index = int(environ[INDEX_ENV])
    except ValueError:
        raise ValueError(f"{INDEX_ENV} is not an integer: {environ[INDEX_ENV]!r}") from None
    return tf_config(cluster, index)


def trainer_image(config: ExperimentConfig) -> str:
    kube = config.kubernetes
    if kube.trainer_pool.accelerator_count and kube.gpu_image:
        return kube.gpu_image
    return kube.image


def trainer_resources(config: ExperimentConfig) -> dict[str, dict[str, str]]:
    """requests/limits of one worker, as the compiled pipeline's trainer step gets them:
    kubernetes.resources['trainer'] over ['default'], field by field, plus the trainer pool's
    accelerators as a limit on the resource trainer_pool.accelerator_type (nvidia.com/gpu)."""
    kube = config.kubernetes
    merged: dict[str, str] = {}
    for entry in ("default", "trainer"):
        if entry in kube.resources:
            merged.update({field: value for field, value in kube.resources[entry].model_dump().items() if value is not None})
    requests = {key: merged[field] for key, field in (("cpu", "cpu"), ("memory", "memory")) if field in merged}
    limits = {key: merged[field] for key, field in (("cpu", "cpu_limit"), ("memory", "memory_limit")) if field in merged}
    pool = kube.trainer_pool
    if pool.accelerator_count:
        limits[pool.accelerator_type or GPU_RESOURCE] = str(pool.accelerator_count)
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def node_placement(config: ExperimentConfig) -> dict[str, Any]:
    """nodeSelector and tolerations of the trainer pool (a pod spec fragment); the GPU model is
    chosen by trainer_pool.node_selector (e.g. cloud.google.com/gke-accelerator: nvidia-tesla-t4)."""
    pool = config.kubernetes.trainer_pool
    selector = dict(pool.node_selector)
    tolerations = [toleration.model_dump(exclude_none=True) for toleration in pool.tolerations]
    placement: dict[str, Any] = {}
    if selector:
        placement["nodeSelector"] = selector
    if tolerations:
        placement["tolerations"] = tolerations
    return placement


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_USER,
        "runAsGroup": RUN_USER,
        "fsGroup": RUN_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def secret_env(config: ExperimentConfig) -> list[dict[str, Any]]:
    """kubernetes.secrets as env entries that reference the Secrets (values never appear here)."""
    return [
        {"name": item.env, "valueFrom": {"secretKeyRef": {"name": item.secret, "key": item.key}}}
        for item in config.kubernetes.secrets
    ]


def _volumes(config: ExperimentConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if config.kubernetes.pvc:
        volumes.append({"name": "artifacts", "persistentVolumeClaim": {"claimName": config.kubernetes.pvc}})
        mounts.append({"name": "artifacts", "mountPath": _pvc_mount_path(config)})
    return volumes, mounts


def _pvc_mount_path(config: ExperimentConfig) -> str:
    return getattr(config.kubernetes, "pvc_mount_path", WORK_DIR)


def _container(config: ExperimentConfig, name: str, command: Sequence[str], env: list[dict[str, Any]]) -> dict[str, Any]:
    _, mounts = _volumes(config)
    container: dict[str, Any] = {
        "name": name,
        "image": trainer_image(config),
        "command": list(command),
        "workingDir": _pvc_mount_path(config) if config.kubernetes.pvc else "/tmp",
        "env": env + [{"name": "HOME", "value": "/tmp"}] + secret_env(config),
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
    }
    resources = trainer_resources(config)
    if resources:
        container["resources"] = resources
    return container


def _pod_spec(config: ExperimentConfig, container: dict[str, Any]) -> dict[str, Any]:
    volumes, _ = _volumes(config)
    return {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # workers never call the Kubernetes API
        "securityContext": pod_security_context(),
        **node_placement(config),
        "containers": [container],
        "volumes": volumes,
    }


def _metadata(config: ExperimentConfig, run_id: str) -> dict[str, Any]:
    return {"name": job_name(config, run_id), "namespace": config.kubernetes.namespace, "labels": labels(config, run_id)}


def _check_workers(config: ExperimentConfig) -> int:
    workers = config.trainer.workers
    if workers < 2:
        raise ValueError(f"trainer.workers is {workers}: a multi-worker launch needs at least 2")
    return workers


def headless_service(config: ExperimentConfig, run_id: str) -> dict[str, Any]:
    """The Service that gives each Indexed Job pod the DNS name `<job>-<index>.<service>`."""
    name = job_name(config, run_id)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(config, run_id),
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_LABEL: name},
            # workers look each other up while they start, before any of them is "ready"
            "publishNotReadyAddresses": True,
            "ports": [{"name": PORT_NAME, "port": PORT, "targetPort": PORT, "protocol": "TCP"}],
        },
    }


def _plain_env(env: Mapping[str, str]) -> list[dict[str, Any]]:
    return [{"name": name, "value": value} for name, value in env.items()]


def indexed_job(config: ExperimentConfig, run_id: str, command: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """An Indexed Job of `trainer.workers` pods that run `command` with their own TF_CONFIG
    (and `env`, the same in every pod)."""
    workers = _check_workers(config)
    name = job_name(config, run_id)
    cluster = {"worker": worker_hosts(name, name, workers)}
    wrapped = ["python3", "-m", "segflow.cluster.k8s_objects", "exec", "--", *command]
    container = _container(config, WORKER_CONTAINER, wrapped, [{"name": CLUSTER_ENV, "value": json.dumps(cluster)}, *_plain_env(env or {})])
    pod_spec = _pod_spec(config, container)
    pod_spec["subdomain"] = name  # with the headless Service of that name: <job>-<index>.<service>
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(config, run_id),
        "spec": {
            "completionMode": "Indexed",
            "completions": workers,
            "parallelism": workers,
            "backoffLimit": config.kubernetes.retries,
            "activeDeadlineSeconds": config.trainer.timeout_seconds,
            "ttlSecondsAfterFinished": TTL_SECONDS,
            "template": {"metadata": {"labels": labels(config, run_id)}, "spec": pod_spec},
        },
    }


def tfjob(config: ExperimentConfig, run_id: str, command: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A kubeflow.org/v1 TFJob: one Chief and `trainer.workers - 1` Workers running `command`
    (with `env`); the training operator sets TF_CONFIG (cluster {chief, worker}) in each pod."""
    workers = _check_workers(config)
    container = _container(config, TFJOB_CONTAINER, command, _plain_env(env or {}))

    def replica(count: int) -> dict[str, Any]:
        return {
            "replicas": count,
            "restartPolicy": "Never",
            "template": {"metadata": {"labels": labels(config, run_id)}, "spec": _pod_spec(config, copy.deepcopy(container))},
        }

    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "TFJob",
        "metadata": _metadata(config, run_id),
        "spec": {
            "runPolicy": {
                "cleanPodPolicy": "All",
                "backoffLimit": config.kubernetes.retries,
                "activeDeadlineSeconds": config.trainer.timeout_seconds,
                "ttlSecondsAfterFinished": TTL_SECONDS,
            },
            # The launcher reads every worker's result: succeed when all are done, not the chief alone.
            "successPolicy": "AllWorkers",
            "tfReplicaSpecs": {"Chief": replica(1), "Worker": replica(workers - 1)},
        },
    }


def launch_objects(
    config: ExperimentConfig, run_id: str, command: Sequence[str], launcher: str = "indexed_job", env: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """What a cluster launch creates, in creation order: [Service, Job] or [TFJob]."""
    if launcher == "tfjob":
        return [tfjob(config, run_id, command, env)]
    if launcher == "indexed_job":
        return [headless_service(config, run_id), indexed_job(config, run_id, command, env)]
    raise ValueError(f"no Kubernetes objects for launcher {launcher!r}; expected indexed_job or tfjob")


def main(argv: Sequence[str] | None = None) -> None:
    """`python3 -m segflow.cluster.k8s_objects exec -- COMMAND...`: set TF_CONFIG for this Indexed Job
    pod and exec COMMAND (the worker), which then sees TF_CONFIG like under the training operator."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] != "exec" or argv[1] != "--":
        raise SystemExit("usage: python3 -m segflow.cluster.k8s_objects exec -- COMMAND [ARG...]")
    try:
        config = tf_config_from_environment()
    except ValueError as error:
        raise SystemExit(f"segflow.cluster.k8s_objects: {error}") from None
    os.environ["TF_CONFIG"] = json.dumps(config)
    command = argv[2:]
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
