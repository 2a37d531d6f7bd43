"""What every KFP component wrapper shares, and the per-task settings a pipeline build lays
over the components: the image, caching, and (on a cluster) the `kubernetes` section.

The component decorators carry a default image; the config's `kubernetes.image` (and
`gpu_image` for a trainer with accelerators) replaces it on each task with
`PipelineTask.set_container_image`, so one set of components serves every registry and tag.
Node pools, resources, retries, Secret env vars and the PVC are compiled into the
pipeline's Kubernetes platform spec with kfp-kubernetes; `segflow run` (kfp.local) does not
apply them, and `local_only_warnings` lists each one that is set, naming its key.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from kfp import dsl

from segflow.config.component_config import REGISTRY_CURRENT
from segflow.config.experiment import ExperimentConfig, KubernetesConfig, NodePool
from segflow.utils.errors import ConfigError

# The default image every component runs in (containers/Dockerfile): segflow and its pinned
# stack are installed there, so component bodies are short calls into `segflow` with nothing
# to install at run time. kfp.local's SubprocessRunner ignores it and uses the current
# environment; a pipeline build sets the config's kubernetes.image on every task.
BASE_IMAGE: str = KubernetesConfig.model_fields["image"].default

component: Callable[[Callable[..., Any]], Any] = functools.partial(dsl.component, base_image=BASE_IMAGE, install_kfp_package=False)

# Every task of the DAG (a pipeline task's name with '_' for '-'); all but the trainer run in the data pool.
TASKS = (
    "dataset_fingerprint", "retrain_gate", "example_gen", "statistics_gen", "schema_gen", "example_validator",
    "transform", "trainer", "evaluator", "cross_validation", "exporter", "pusher",
)
GPU_TASKS = ("trainer",)
DEFAULT_ACCELERATOR = "nvidia.com/gpu"
# Never replayed from the cache: the fingerprint looks at the data as it is now, the gate and
# the evaluator's blessing at the registry's `current` version as it is now, and a replayed
# push would publish nothing and move no alias.
UNCACHED = ("dataset_fingerprint", "retrain_gate", "evaluator", "pusher")


def cached(config: ExperimentConfig, name: str) -> bool:
    """Whether KFP may replay the task from its cache: never for UNCACHED, nor for a task that
    reads the registry's current version through the config (a warm-starting trainer, a
    validator comparing with current's statistics); otherwise kubernetes.caching."""
    reads_current = {
        "trainer": any(stage.initial_weights == REGISTRY_CURRENT for stage in config.stages),
        "example_validator": config.validation.baseline_statistics == REGISTRY_CURRENT,
    }
    return config.kubernetes.caching and name not in UNCACHED and not reads_current.get(name, False)


def pool(kubernetes: KubernetesConfig, task: str) -> tuple[str, NodePool]:
    """(config key, node pool) of a task: the trainer's pool, or the data pool."""
    return ("trainer_pool", kubernetes.trainer_pool) if task in GPU_TASKS else ("data_pool", kubernetes.data_pool)


def image(kubernetes: KubernetesConfig, task: str) -> str:
    """The trainer with accelerators runs the GPU image (when one is configured)."""
    key, node_pool = pool(kubernetes, task)
    if task in GPU_TASKS and node_pool.accelerator_count and kubernetes.gpu_image:
        return kubernetes.gpu_image
    return kubernetes.image


def resources(kubernetes: KubernetesConfig, task: str) -> dict[str, str]:
    """The task's requests and limits: its own entry over the 'default' entry, field by field."""
    merged: dict[str, str] = {}
    for entry in ("default", task):
        if entry in kubernetes.resources:
            merged.update({field: value for field, value in kubernetes.resources[entry].model_dump().items() if value is not None})
    return merged


def check_kubernetes(config: ExperimentConfig) -> None:
    """ConfigError for a `kubernetes.resources` entry that names no task."""
    unknown = sorted(set(config.kubernetes.resources) - {"default", *TASKS})
    if unknown:
        raise ConfigError(f"kubernetes.resources: unknown component {', '.join(map(repr, unknown))}; one of default, {', '.join(TASKS)}")


_RESOURCE_SETTERS = {
    "cpu": "set_cpu_request",
    "memory": "set_memory_request",
    "cpu_limit": "set_cpu_limit",
    "memory_limit": "set_memory_limit",
}


def placement(config: ExperimentConfig, task: str) -> str:
    """The task name whose pool, image and resources a task gets. With trainer.workers > 1 the
    trainer step only launches the worker pods, which get the trainer pool, image and
    resources (segflow/cluster/k8s_objects.py): the step itself runs like a data step ("launcher")."""
    return "launcher" if task in GPU_TASKS and config.trainer.workers > 1 else task


def configure_task(task: dsl.PipelineTask, name: str, config: ExperimentConfig, cluster: bool) -> dsl.PipelineTask:
    """Lay the config's task settings over a pipeline task. Always: the image and caching
    (`cached`). With `cluster`: node pool (node selector, tolerations,
    accelerator type and limit), requests and limits, retries, Secret env vars, the PVC."""
    from kfp import kubernetes as k8s

    settings = config.kubernetes
    task.set_container_image(image(settings, placement(config, name)))
    task.set_caching_options(cached(config, name))
    if not cluster:
        return task
    key, node_pool = pool(settings, placement(config, name))
    for label, value in node_pool.node_selector.items():
        k8s.add_node_selector(task, label_key=label, label_value=value)
    for toleration in node_pool.tolerations:
        k8s.add_toleration(task, key=toleration.key, operator=toleration.operator, value=toleration.value, effect=toleration.effect)
    if node_pool.accelerator_count:
        task.set_accelerator_type(node_pool.accelerator_type or DEFAULT_ACCELERATOR)
        task.set_accelerator_limit(node_pool.accelerator_count)
    for field, value in resources(settings, placement(config, name)).items():
        try:
            getattr(task, _RESOURCE_SETTERS[field])(value)
        except ValueError as error:
            entry = name if name in settings.resources and getattr(settings.resources[name], field) is not None else "default"
            raise ConfigError(f"kubernetes.resources.{entry}.{field}: {value!r} is not a Kubernetes quantity ({error})") from None
    if settings.retries:
        task.set_retry(settings.retries)
    by_secret: dict[str, dict[str, str]] = {}
    for secret in settings.secrets:
        by_secret.setdefault(secret.secret, {})[secret.key] = secret.env
    for secret_name, key_to_env in by_secret.items():
        k8s.use_secret_as_env(task, secret_name=secret_name, secret_key_to_env=key_to_env)
    if settings.pvc:
        k8s.mount_pvc(task, pvc_name=settings.pvc, mount_path=settings.pvc_mount_path)
    return task


def local_only_warnings(config: ExperimentConfig) -> list[tuple[str, str]]:
    """(key, what it does on the cluster) for every set `kubernetes` key that a local run
    (kfp.local) does not apply: accelerators, node selectors, tolerations, resources,
    retries, Secret env vars, the PVC and the pipeline root."""
    settings, found = config.kubernetes, []
    for key, node_pool in (("trainer_pool", settings.trainer_pool), ("data_pool", settings.data_pool)):
        where = "the trainer" if key == "trainer_pool" else "every step but the trainer"
        if node_pool.accelerator_count:
            accelerator = node_pool.accelerator_type or DEFAULT_ACCELERATOR
            found.append((f"kubernetes.{key}.accelerator_count", f"{where} requests {node_pool.accelerator_count} x {accelerator}"))
        if node_pool.node_selector:
            labels = ", ".join(f"{label}={value}" for label, value in node_pool.node_selector.items())
            found.append((f"kubernetes.{key}.node_selector", f"{where} runs only on nodes labelled {labels}"))
        if node_pool.tolerations:
            taints = ", ".join(f"{toleration.key} ({toleration.effect or 'any effect'})" for toleration in node_pool.tolerations)
            found.append((f"kubernetes.{key}.tolerations", f"{where} tolerates the taints {taints}"))
    for entry, values in settings.resources.items():
        for field, value in values.model_dump().items():
            if value is not None:
                kind = "limit" if field.endswith("_limit") else "request"
                found.append((f"kubernetes.resources.{entry}.{field}", f"{kind} {value} for {'every step' if entry == 'default' else entry}"))
    if settings.retries:
        found.append(("kubernetes.retries", f"a failed step is retried up to {settings.retries} times"))
    if settings.secrets:
        found.append(("kubernetes.secrets", "env " + ", ".join(f"{secret.env} from Secret {secret.secret} key {secret.key}" for secret in settings.secrets)))
    if settings.pvc:
        found.append(("kubernetes.pvc", f"PVC {settings.pvc} mounted at {settings.pvc_mount_path}"))
    if settings.pipeline_root:
        found.append(("kubernetes.pipeline_root", f"artifacts written below {settings.pipeline_root}"))
    return found
