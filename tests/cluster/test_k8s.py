"""k8s/ manifests and the launcher's generated objects, validated offline.

Rendering needs `kubectl kustomize` (Debian: `apt-get install kubernetes-client`, kubectl 1.20
with kustomize v2.0) or a `kustomize` binary; SEGFLOW_KUBECTL may name the kubectl to use.
Without one the rendering tests skip and say why. Every object is checked against the
Kubernetes OpenAPI schema of KUBERNETES_VERSION (kubernetes-validate, strict: unknown fields
are errors), a TFJob against the training operator's CRD schema in tests/fixtures/tfjob-crd.yaml.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

from segflow.cluster import k8s_objects
from segflow.config.experiment import ExperimentConfig, validate_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ["cpu-only", "gpu-node-pool"]
KUBERNETES_VERSION = "1.32"
NAMESPACE = "segflow"
OBJECT_STORAGE_SECRET = "segflow-object-storage"
LAUNCHER_VERBS = {"create", "get", "list", "watch", "delete"}
WORKER_COMMAND = ["segflow", "train-worker", "/mnt/segflow/runs/x/trainer.json"]


# ---------------------------------------------------------------------------------------------
# helpers


def _renderer() -> list[str] | None:
    """The command that renders a kustomization directory given as its last argument."""
    explicit = os.environ.get("SEGFLOW_KUBECTL")
    if explicit:
        return [explicit, "kustomize"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


_SKIP_SAID: list[str] = []


@functools.cache
def _render(directory: str) -> tuple[dict[str, Any], ...]:
    command = _renderer()
    if command is None:
        reason = (
            "k8s/ rendering tests skipped: neither kubectl nor kustomize is on PATH "
            "(apt-get install kubernetes-client, or set SEGFLOW_KUBECTL)"
        )
        if not _SKIP_SAID:  # once, in pytest's warnings summary, so it shows without -rs
            warnings.warn(reason, stacklevel=1)
            _SKIP_SAID.append(reason)
        pytest.skip(reason)
    result = subprocess.run([*command, directory], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} {directory} failed:\n{result.stderr}"
    return tuple(document for document in yaml.safe_load_all(result.stdout) if document)


def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return _render(str(K8S / "overlays" / overlay))


def find(objects: tuple[dict[str, Any], ...] | list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)]


def one(objects: tuple[dict[str, Any], ...] | list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = find(objects, kind, name)
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_templates(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Pod templates ({metadata, spec}) of a workload object."""
    kind = obj["kind"]
    if kind == "CronJob":
        yield obj["spec"]["jobTemplate"]["spec"]["template"]
    elif kind in ("Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        yield obj["spec"]["template"]
    elif kind == "TFJob":
        for replica in obj["spec"]["tfReplicaSpecs"].values():
            yield replica["template"]
    elif kind == "Pod":
        yield {"metadata": obj["metadata"], "spec": obj["spec"]}


RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """What in a pod spec breaks Pod Security "restricted" or our own rules (read-only root,
    /tmp on an emptyDir)."""
    problems = []
    pod = spec.get("securityContext", {})
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        problems.append("host namespaces")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']} of type {kinds}")
    empty_dirs = {volume["name"] for volume in spec.get("volumes", []) if "emptyDir" in volume}
    for container in spec.get("initContainers", []) + spec["containers"]:
        name = container["name"]
        context = container.get("securityContext", {})
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: root filesystem is writable")
        if context.get("privileged"):
            problems.append(f"{name}: privileged")
        capabilities = context.get("capabilities", {})
        if capabilities.get("drop") != ["ALL"]:
            problems.append(f"{name}: capabilities not dropped (drop: {capabilities.get('drop')})")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {capabilities['add']}")
        if not (context.get("runAsNonRoot", pod.get("runAsNonRoot")) is True):
            problems.append(f"{name}: runAsNonRoot is not true")
        if context.get("runAsUser", pod.get("runAsUser")) == 0:
            problems.append(f"{name}: runs as uid 0")
        seccomp = context.get("seccompProfile", pod.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile {seccomp}")
        for port in container.get("ports", []):
            if "hostPort" in port:
                problems.append(f"{name}: hostPort")
        tmp = [mount for mount in container.get("volumeMounts", []) if mount["mountPath"] == "/tmp"]
        if not tmp or tmp[0]["name"] not in empty_dirs:
            problems.append(f"{name}: /tmp is not an emptyDir")
    return problems


def validate_kubernetes(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def _strict(schema: Any) -> Any:
    """The schema with unknown properties rejected (CRD schemas prune them silently; the API
    server's strict field validation rejects them)."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(value) for value in schema]
    return schema


@functools.cache
def _tfjob_validator() -> jsonschema.Validator:
    crd = yaml.safe_load((ROOT / "tests" / "fixtures" / "tfjob-crd.yaml").read_text())
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["group"] == "kubeflow.org"
    (version,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


# Replica types the training operator accepts (kubeflow.org/v1 tensorflow_types.go); the CRD
# schema itself leaves the map keys open.
TFJOB_REPLICA_TYPES = {"Chief", "Master", "Worker", "PS", "Evaluator"}


def validate_tfjob(obj: dict[str, Any]) -> None:
    assert obj["apiVersion"] == "kubeflow.org/v1" and obj["kind"] == "TFJob"
    _tfjob_validator().validate(obj)
    assert set(obj["spec"]["tfReplicaSpecs"]) <= TFJOB_REPLICA_TYPES
    # the metadata of the object itself is checked by the API server's ObjectMeta rules
    validate_kubernetes({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]})


def cluster_config(**kubernetes: Any) -> ExperimentConfig:
    raw = yaml.safe_load((K8S / "base" / "experiment.yaml").read_text())
    raw["trainer"] = {"workers": 3}
    raw["kubernetes"].update(kubernetes)
    return validate_config(raw)


# ---------------------------------------------------------------------------------------------
# rendered manifests


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(overlay: str) -> None:
    objects = rendered(overlay)
    kinds = sorted({obj["kind"] for obj in objects})
    assert kinds == sorted(
        ["Namespace", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "ConfigMap", "NetworkPolicy", "CronJob"]
    )
    for obj in objects:
        validate_kubernetes(obj)  # raises kubernetes_validate.ValidationError naming the field
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "segflow", obj["metadata"]


def test_strict_validation_catches_a_misspelt_field() -> None:
    """The schema check is not vacuous: a misspelt CronJob field fails."""
    cronjob = copy.deepcopy(one(rendered("cpu-only"), "CronJob", "segflow-run"))
    cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["nodeSelectors"] = {"a": "b"}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_kubernetes(cronjob)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespace_enforces_pod_security_restricted_and_pods_comply(overlay: str) -> None:
    objects = rendered(overlay)
    namespace = one(objects, "Namespace", NAMESPACE)
    for mode in ("enforce", "audit", "warn"):
        assert namespace["metadata"]["labels"][f"pod-security.kubernetes.io/{mode}"] == "restricted"
    workloads = [obj for obj in objects if list(pod_templates(obj))]
    assert {obj["metadata"]["name"] for obj in workloads} == {"segflow-run", "segflow-submit"}
    for obj in workloads:
        for template in pod_templates(obj):
            assert restricted_violations(template["spec"]) == [], obj["metadata"]["name"]
            # the label NetworkPolicy segflow-allow selects
            assert template["metadata"]["labels"]["app.kubernetes.io/part-of"] == "segflow"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_launcher_role_is_least_privilege_in_its_own_namespace(overlay: str) -> None:
    objects = rendered(overlay)
    assert not find(objects, "ClusterRole") and not find(objects, "ClusterRoleBinding")
    role = one(objects, "Role", "segflow-launcher")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted[(group, resource)] = set(rule["verbs"])
    assert granted[("batch", "jobs")] == LAUNCHER_VERBS
    assert granted[("", "pods")] == LAUNCHER_VERBS
    assert granted[("", "services")] == LAUNCHER_VERBS
    assert granted[("", "pods/log")] == {"get"}
    assert set(granted) - {("batch", "jobs"), ("", "pods"), ("", "services"), ("", "pods/log")} == {("kubeflow.org", "tfjobs")}
    assert granted[("kubeflow.org", "tfjobs")] == LAUNCHER_VERBS
    assert all(verbs <= LAUNCHER_VERBS for verbs in granted.values())

    binding = one(objects, "RoleBinding", "segflow-launcher")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "segflow-launcher"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "segflow-launcher", "namespace": NAMESPACE}]
    assert len(find(objects, "RoleBinding")) == 1  # the submitter has no Kubernetes API rights

    run = one(objects, "CronJob", "segflow-run")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    submit = one(objects, "CronJob", "segflow-submit")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert run["serviceAccountName"] == "segflow-launcher"
    assert submit["serviceAccountName"] == "segflow-submitter" and submit["automountServiceAccountToken"] is False
    assert one(objects, "ServiceAccount", "segflow-submitter")["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_object_storage_credentials_are_secret_references_only(overlay: str) -> None:
    objects = rendered(overlay)
    assert not find(objects, "Secret"), "credentials are never committed: the user creates the Secret"
    references = 0
    for obj in objects:
        for template in pod_templates(obj):
            for container in template["spec"]["containers"]:
                for env in container.get("env", []):
                    sensitive = env["name"].startswith("AWS_") or any(word in env["name"] for word in ("SECRET", "PASSWORD"))
                    if sensitive:
                        assert "value" not in env and "secretKeyRef" in env["valueFrom"], env
                    if "secretKeyRef" in env.get("valueFrom", {}):
                        assert env["valueFrom"]["secretKeyRef"]["name"] == OBJECT_STORAGE_SECRET
                        references += 1
    assert references >= 2
    # the experiment the CronJobs run names the same Secret for its steps and worker pods
    experiment = validate_config(yaml.safe_load(one(objects, "ConfigMap", "segflow-experiment")["data"]["experiment.yaml"]))
    assert {item.secret for item in experiment.kubernetes.secrets} == {OBJECT_STORAGE_SECRET}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_denies_by_default_and_allows_segflow_pods(overlay: str) -> None:
    objects = rendered(overlay)
    deny = one(objects, "NetworkPolicy", "segflow-default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    allow = one(objects, "NetworkPolicy", "segflow-allow")["spec"]
    segflow_pods = {"matchLabels": {"app.kubernetes.io/part-of": "segflow"}}
    assert allow["podSelector"] == segflow_pods
    assert allow["ingress"] == [{"from": [{"podSelector": segflow_pods}]}]  # no ingress from outside
    dns = [rule for rule in allow["egress"] if {"protocol": "UDP", "port": 53} in rule.get("ports", [])]
    assert dns, "pods must reach the cluster DNS"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cronjobs_run_the_segflow_cli_on_the_experiment(overlay: str) -> None:
    from segflow.cli import build_parser

    objects = rendered(overlay)
    experiment_map = one(objects, "ConfigMap", "segflow-experiment")
    experiment = validate_config(yaml.safe_load(experiment_map["data"]["experiment.yaml"]))
    assert experiment.kubernetes.namespace == NAMESPACE
    assert experiment.kubernetes.service_account == "segflow-launcher"
    assert experiment.kubernetes.pvc == one(objects, "PersistentVolumeClaim", "segflow-artifacts")["metadata"]["name"]

    parser = build_parser()
    settings = one(objects, "ConfigMap", "segflow-settings")["data"]
    subcommands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices
    for name, command in (("segflow-run", "run"), ("segflow-submit", "submit")):
        cronjob = one(objects, "CronJob", name)
        assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
        spec = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert container["command"] == ["segflow"]
        assert container["args"][:2] == [command, "/etc/segflow/experiment.yaml"]
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        assert volumes[mounts["/etc/segflow"]]["configMap"]["name"] == "segflow-experiment"
        if command in subcommands:  # `segflow submit` may not exist yet
            args = list(container["args"])
            for name_, value in settings.items():  # what Kubernetes expands $(VAR) to
                args = [arg.replace(f"$({name_})", value) for arg in args]
            assert "$(" not in " ".join(args)
            parser.parse_args(args)
    run = one(objects, "CronJob", "segflow-run")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in run["volumes"]}
    assert volumes["artifacts"]["persistentVolumeClaim"]["claimName"] == "segflow-artifacts"
    assert run["containers"][0]["workingDir"] == "/mnt/segflow"
    submit = one(objects, "CronJob", "segflow-submit")
    assert submit["spec"]["suspend"] is True  # needs Kubeflow Pipelines: switched on by the user


def test_gpu_overlay_puts_the_run_cronjob_on_the_gpu_pool() -> None:
    cpu, gpu = rendered("cpu-only"), rendered("gpu-node-pool")
    run = one(gpu, "CronJob", "segflow-run")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = run["containers"]
    assert container["image"] == "ghcr.io/segflow/segflow-gpu:0.1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert run["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in run["tolerations"]

    cpu_run = one(cpu, "CronJob", "segflow-run")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert cpu_run["containers"][0]["image"] == "ghcr.io/segflow/segflow:0.1.0"
    assert "nvidia.com/gpu" not in json.dumps(cpu_run) and "tolerations" not in cpu_run
    # only the run CronJob differs between the overlays
    key = lambda obj: (obj["kind"], obj["metadata"]["name"])  # noqa: E731
    differing = {key(a) for a, b in zip(sorted(cpu, key=key), sorted(gpu, key=key)) if a != b}
    assert differing == {("CronJob", "segflow-run")}


# ---------------------------------------------------------------------------------------------
# generated launcher objects (segflow.cluster.k8s_objects)


def test_indexed_job_and_headless_service_validate() -> None:
    config = cluster_config()
    service, job = k8s_objects.launch_objects(config, "20260101-120000", WORKER_COMMAND)
    validate_kubernetes(service)
    validate_kubernetes(job)
    name = k8s_objects.job_name(config, "20260101-120000")
    assert job["metadata"]["name"] == service["metadata"]["name"] == name
    assert job["metadata"]["namespace"] == service["metadata"]["namespace"] == NAMESPACE
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
    assert spec["activeDeadlineSeconds"] == config.trainer.timeout_seconds
    assert service["spec"]["clusterIP"] == "None"
    pod = spec["template"]
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    selector = service["spec"]["selector"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert restricted_violations(pod["spec"]) == []
    assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "segflow"  # NetworkPolicy segflow-allow
    (container,) = pod["spec"]["containers"]
    assert container["command"][-len(WORKER_COMMAND):] == WORKER_COMMAND
    assert container["ports"][0]["containerPort"] == service["spec"]["ports"][0]["targetPort"]


def test_tfjob_validates_against_the_training_operator_crd() -> None:
    config = cluster_config()
    (tfjob,) = k8s_objects.launch_objects(config, "20260101-120000", WORKER_COMMAND, launcher="tfjob")
    validate_tfjob(tfjob)
    replicas = tfjob["spec"]["tfReplicaSpecs"]
    assert replicas["Chief"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    for replica in replicas.values():
        spec = replica["template"]["spec"]
        assert restricted_violations(spec) == []
        (container,) = spec["containers"]
        assert container["name"] == "tensorflow" and container["command"] == WORKER_COMMAND
        assert "TF_CONFIG" not in json.dumps(container)  # the operator writes it
        # the pod template is a valid core PodTemplateSpec too
        validate_kubernetes({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": replica["template"]})


def test_crd_validation_catches_a_misspelt_field() -> None:
    (tfjob,) = k8s_objects.launch_objects(cluster_config(), "r1", WORKER_COMMAND, launcher="tfjob")
    broken = copy.deepcopy(tfjob)
    broken["spec"]["runPolicy"]["cleanPodPolicies"] = "All"
    with pytest.raises(jsonschema.ValidationError):
        validate_tfjob(broken)
    broken = copy.deepcopy(tfjob)
    broken["spec"]["tfReplicaSpecs"]["Worker"]["replicas"] = "2"
    with pytest.raises(jsonschema.ValidationError):
        validate_tfjob(broken)


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_tf_config_of_each_pod_names_every_worker_and_itself(workers: int) -> None:
    raw = yaml.safe_load((K8S / "base" / "experiment.yaml").read_text())
    raw["trainer"] = {"workers": workers}
    config = validate_config(raw)
    service, job = k8s_objects.launch_objects(config, "run-7", WORKER_COMMAND)
    name, subdomain = job["metadata"]["name"], job["spec"]["template"]["spec"]["subdomain"]
    expected = [f"{name}-{index}.{service['metadata']['name']}:2222" for index in range(workers)]
    assert subdomain == service["metadata"]["name"]
    env = {item["name"]: item["value"] for item in job["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in item}
    seen = set()
    for index in range(workers):
        # what Kubernetes adds to pod `index` of an Indexed Job
        tf_config = k8s_objects.tf_config_from_environment({**env, "JOB_COMPLETION_INDEX": str(index)})
        assert tf_config["cluster"] == {"worker": expected}
        assert tf_config["task"] == {"type": "worker", "index": index}
        # its own address is <job>-<index>.<service>: the hostname Kubernetes gives the pod
        seen.add(tf_config["cluster"]["worker"][tf_config["task"]["index"]].split(".")[0])
    assert seen == {f"{name}-{index}" for index in range(workers)}
    with pytest.raises(ValueError, match="outside"):
        k8s_objects.tf_config_from_environment({**env, "JOB_COMPLETION_INDEX": str(workers)})
    with pytest.raises(ValueError, match="JOB_COMPLETION_INDEX"):
        k8s_objects.tf_config_from_environment(env)


def test_exec_wrapper_sets_tf_config_and_runs_the_worker() -> None:
    """`python3 -m segflow.cluster.k8s_objects exec -- COMMAND` as the Indexed Job pod runs it."""
    config = cluster_config()
    job = k8s_objects.indexed_job(config, "r1", [sys.executable, "-c", "import os; print(os.environ['TF_CONFIG'])"])
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    command = [sys.executable, *container["command"][1:]]  # python3 of this venv
    assert container["command"][:4] == ["python3", "-m", "segflow.cluster.k8s_objects", "exec"]
    result = subprocess.run(
        command, env={**os.environ, **env, "JOB_COMPLETION_INDEX": "2"}, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    tf_config = json.loads(result.stdout)
    assert tf_config["task"] == {"type": "worker", "index": 2} and len(tf_config["cluster"]["worker"]) == 3
    failed = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert failed.returncode != 0 and "JOB_COMPLETION_INDEX" in failed.stderr


def test_trainer_pool_accelerators_image_and_secrets_reach_the_worker_pods() -> None:
    config = cluster_config(
        gpu_image="ghcr.io/segflow/segflow-gpu:0.1.0",
        trainer_pool={
            "node_selector": {"pool": "gpu", "cloud.google.com/gke-accelerator": "nvidia-tesla-t4"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "accelerator_count": 2,
        },
        resources={"default": {"cpu": "1", "memory": "2Gi", "memory_limit": "24Gi"}, "trainer": {"cpu": "4", "memory": "16Gi"}},
        retries=2,
    )
    for obj in k8s_objects.launch_objects(config, "r1", WORKER_COMMAND) + k8s_objects.launch_objects(config, "r1", WORKER_COMMAND, "tfjob"):
        if obj["kind"] == "Service":
            continue
        validate_tfjob(obj) if obj["kind"] == "TFJob" else validate_kubernetes(obj)
        for template in pod_templates(obj):
            spec = template["spec"]
            assert spec["nodeSelector"] == {"pool": "gpu", "cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
            assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            (container,) = spec["containers"]
            assert container["image"] == "ghcr.io/segflow/segflow-gpu:0.1.0"
            assert container["resources"] == {  # trainer over default, field by field
                "requests": {"cpu": "4", "memory": "16Gi"},
                "limits": {"memory": "24Gi", "nvidia.com/gpu": "2"},
            }
            refs = [item for item in container["env"] if "valueFrom" in item]
            assert [(item["name"], item["valueFrom"]["secretKeyRef"]) for item in refs] == [
                (item.env, {"name": item.secret, "key": item.key}) for item in config.kubernetes.secrets
            ]
            volumes = {volume["name"]: volume for volume in spec["volumes"]}
            assert volumes["artifacts"]["persistentVolumeClaim"]["claimName"] == "segflow-artifacts"
    job = k8s_objects.indexed_job(config, "r1", WORKER_COMMAND)
    assert job["spec"]["backoffLimit"] == 2
    amd = cluster_config(trainer_pool={"accelerator_type": "amd.com/gpu", "accelerator_count": 1})
    assert k8s_objects.trainer_resources(amd) == {"limits": {"amd.com/gpu": "1"}}

    cpu = cluster_config(gpu_image="ghcr.io/segflow/segflow-gpu:0.1.0")
    container = k8s_objects.indexed_job(cpu, "r1", WORKER_COMMAND)["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == cpu.kubernetes.image and "resources" not in container


def test_names_are_dns_labels_and_one_worker_is_refused() -> None:
    raw = yaml.safe_load((K8S / "base" / "experiment.yaml").read_text())
    raw.update(name="Nuclei_UNet.v2" + "x" * 80, trainer={"workers": 64})
    config = validate_config(raw)
    service, job = k8s_objects.launch_objects(config, "2026-01-01T12:00:00", WORKER_COMMAND)
    validate_kubernetes(service)
    validate_kubernetes(job)
    name = job["metadata"]["name"]
    assert len(name) <= 52 and name[0].isalpha() and name == name.lower()
    hosts = json.loads(next(item["value"] for item in job["spec"]["template"]["spec"]["containers"][0]["env"] if item["name"] == "SEGFLOW_TF_CLUSTER"))
    assert all(len(host.split(".")[0]) <= 63 for host in hosts["worker"])
    assert k8s_objects.job_name(config, "a") != k8s_objects.job_name(config, "b")
    assert k8s_objects.dns_label("7up") == "sf-7up"

    raw["trainer"] = {"workers": 1}
    with pytest.raises(ValueError, match="at least 2"):
        k8s_objects.indexed_job(validate_config(raw), "r1", WORKER_COMMAND)
    with pytest.raises(ValueError, match="launcher"):
        k8s_objects.launch_objects(config, "r1", WORKER_COMMAND, launcher="local")
