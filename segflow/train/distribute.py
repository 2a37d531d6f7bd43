"""Which tf.distribute strategy the trainer runs under, and what follows from it.

`trainer.distribution`:
- `auto`: MultiWorkerMirroredStrategy when TF_CONFIG names several workers; else
  MirroredStrategy over every visible GPU when there are two or more (TensorFlow applies
  CUDA_VISIBLE_DEVICES when it lists them); else the default strategy on one device.
- `one_device`, `mirrored`, `multi_worker`: that strategy, whatever the machine has.
  `mirrored` without GPUs mirrors over the logical CPU devices (one, unless configured).

The global batch is the per-replica batch (config `batch`) times the replicas in sync, and
the learning rate can scale with it (`trainer.scale_learning_rate`). Under several workers
only the chief writes: `is_chief` follows TensorFlow's convention (the `chief` task, or
worker 0 when the cluster has none).

MultiWorkerMirroredStrategy configures collective ops on TensorFlow's eager context, which
must happen before the first op runs: call `make_plan` first thing in a worker process.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

KINDS = ("one_device", "mirrored", "multi_worker")
WORKER_TASKS = ("chief", "worker")  # the task types that train (TF_CONFIG may also name an evaluator)


def parse_tf_config(text: str | None) -> dict[str, Any]:
    """TF_CONFIG as a dict ({} when unset); malformed JSON is an error naming the variable."""
    if not text:
        return {}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}): {text[:200]!r}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object, got {type(parsed).__name__}")
    return parsed


def tf_config(cluster: Mapping[str, Any], index: int) -> dict[str, Any]:
    """TF_CONFIG of worker `index` in `cluster` ({"worker": [host:port, ...]}); worker 0 is the chief."""
    workers = list(cluster.get("worker", ()))
    if not 0 <= index < len(workers):
        raise ValueError(f"worker index {index} is outside the cluster's {len(workers)} workers")
    return {"cluster": {kind: list(hosts) for kind, hosts in cluster.items()}, "task": {"type": "worker", "index": index}}


def cluster_workers(tf_config: Mapping[str, Any]) -> int:
    """How many training tasks (chief plus workers) the cluster spec names."""
    cluster = tf_config.get("cluster") or {}
    return sum(len(cluster.get(kind) or ()) for kind in WORKER_TASKS)


def is_chief(tf_config: Mapping[str, Any]) -> bool:
    """True for the task that writes: the `chief` task, or worker 0 of a cluster without one.
    Without TF_CONFIG the only process is the chief."""
    task = tf_config.get("task") or {}
    if not task:
        return True
    if task.get("type") == "chief":
        return True
    cluster = tf_config.get("cluster") or {}
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0 and not cluster.get("chief")


def task_index(tf_config: Mapping[str, Any]) -> int:
    """A unique index among the training tasks: the chief 0, then the workers in order."""
    task = tf_config.get("task") or {}
    if not task or task.get("type") == "chief":
        return 0
    has_chief = bool((tf_config.get("cluster") or {}).get("chief"))
    return int(task.get("index", 0)) + (1 if has_chief else 0)


def choose_kind(distribution: str, tf_config: Mapping[str, Any], gpus: int) -> str:
    """The strategy kind for a `trainer.distribution` value, a parsed TF_CONFIG and a GPU count."""
    if distribution != "auto":
        if distribution not in KINDS:
            raise ValueError(f"trainer.distribution {distribution!r}: expected auto or one of {', '.join(KINDS)}")
        return distribution
    if cluster_workers(tf_config) > 1:
        return "multi_worker"
    if gpus > 1:
        return "mirrored"
    return "one_device"


def visible_gpus() -> list[str]:
    """The GPUs this process may use (TensorFlow hides those CUDA_VISIBLE_DEVICES leaves out)."""
    import tensorflow as tf

    return [device.name for device in tf.config.list_physical_devices("GPU")]


def scaled_learning_rate(learning_rate: float, replicas: int, scale: bool) -> float:
    """The linear scaling rule: the learning rate grows with the global batch when asked to."""
    return learning_rate * replicas if scale else learning_rate


def evaluation_batch(examples: int, replicas: int, per_replica: int) -> tuple[int, bool]:
    """(global batch, drop_remainder) for a split evaluated under `replicas` replicas.

    A global batch is cut into per-replica batches of `per_replica`; a short last batch
    that leaves a replica with nothing breaks convolutions (oneDNN rejects empty batches).
    So pick a per-replica size near the training one (up to twice it, else smaller) whose
    last batch reaches every replica; failing that, drop the last batch."""
    if replicas == 1:
        return per_replica, False
    for size in [*range(per_replica, 2 * per_replica + 1), *range(per_replica - 1, 0, -1)]:
        rest = examples % (size * replicas)
        if rest == 0 or rest > (replicas - 1) * size:
            return size * replicas, False
    return per_replica * replicas, True


@dataclass
class Plan:
    """A strategy and the facts the trainer needs about it."""

    kind: str
    strategy: Any  # tf.distribute.Strategy
    replicas: int  # replicas in sync across all workers
    workers: int  # training tasks in the cluster (1 without TF_CONFIG)
    chief: bool  # this process writes checkpoints, logs, history and the model
    index: int  # this task's index among the training tasks (chief 0)

    def global_batch(self, per_replica: int) -> int:
        return per_replica * self.replicas

    def describe(self) -> str:
        where = f", worker {self.index} of {self.workers}{' (chief)' if self.chief else ''}" if self.workers > 1 else ""
        return f"{self.kind} strategy, {self.replicas} replica{'s' if self.replicas != 1 else ''} in sync{where}"


def make_plan(distribution: str = "auto", environ: Mapping[str, str] | None = None) -> Plan:
    """Create the strategy for `distribution` in this process (see the module docstring)."""
    import tensorflow as tf

    environ = os.environ if environ is None else environ
    tf_config = parse_tf_config(environ.get("TF_CONFIG"))
    gpus = visible_gpus()
    kind = choose_kind(distribution, tf_config, len(gpus))
    workers = max(cluster_workers(tf_config), 1)
    chief, index = is_chief(tf_config), task_index(tf_config)
    if kind == "multi_worker":
        # CPU collectives go over gRPC between the workers: RING is the implementation that
        # exists there (NCCL needs GPUs); with GPUs let TensorFlow pick.
        implementation = tf.distribute.experimental.CommunicationImplementation
        options = tf.distribute.experimental.CommunicationOptions(implementation=implementation.AUTO if gpus else implementation.RING)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    elif kind == "mirrored":
        devices = gpus or [device.name for device in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
        workers, chief, index = 1, True, 0
    elif distribution == "one_device":
        strategy = tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
        workers, chief, index = 1, True, 0
    else:  # auto on one device: the default strategy, exactly as without tf.distribute
        strategy = tf.distribute.get_strategy()
        workers, chief, index = 1, True, 0
    return Plan(kind, strategy, int(strategy.num_replicas_in_sync), workers, chief, index)


def shard_by_data(dataset: Any) -> Any:
    """Shard a dataset between workers by element (auto-shard policy DATA): every worker
    reads the same records and keeps its own part of each global batch. File sharding would
    give workers different numbers of batches (a few shard files, a stream concatenated per
    epoch), and a worker that runs out first leaves the others waiting in a collective."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)
