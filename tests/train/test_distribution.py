"""Distribution strategies and the local multi-worker launcher (trainer.distribution, trainer.workers).

Strategy choice is tested as pure functions and in subprocesses (TensorFlow's device setup
and CUDA_VISIBLE_DEVICES act once per process); MirroredStrategy over 2 logical CPU devices
trains in a subprocess; MultiWorkerMirroredStrategy runs as 2 real worker processes on
localhost, through the trainer core and (slow) through `segflow run`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from segflow.config.experiment import validate_config
from segflow.train.distribute import (
    choose_kind,
    cluster_workers,
    evaluation_batch,
    is_chief,
    parse_tf_config,
    scaled_learning_rate,
    task_index,
    tf_config,
)
from segflow.cluster.launcher import backend_name, launch
from segflow.cluster.workers import SCRATCH_ENV, LaunchRequest, WorkerFailed
from tests.conftest import tiny_raw_config

ROOT = Path(__file__).resolve().parents[2]


def _cluster(workers: int, index: int = 0, chief: bool = False) -> dict[str, Any]:
    cluster: dict[str, Any] = {"worker": [f"w{i}:2222" for i in range(workers)]}
    if chief:
        cluster["chief"] = ["c:2222"]
    return {"cluster": cluster, "task": {"type": "worker", "index": index}}


# ---------------------------------------------------------------- strategy choice (unit)


@pytest.mark.parametrize(
    ("distribution", "tf_config", "gpus", "kind"),
    [
        ("auto", {}, 0, "one_device"),
        ("auto", {}, 1, "one_device"),
        ("auto", {}, 2, "mirrored"),
        ("auto", _cluster(2), 0, "multi_worker"),
        ("auto", _cluster(2), 4, "multi_worker"),  # several workers win over local GPUs
        ("auto", _cluster(1), 2, "mirrored"),  # a one-worker cluster is not multi-worker
        ("auto", _cluster(1, chief=True), 0, "multi_worker"),  # chief + 1 worker = 2 tasks
        ("one_device", _cluster(2), 2, "one_device"),  # explicit values force the strategy
        ("mirrored", {}, 0, "mirrored"),
        ("multi_worker", {}, 0, "multi_worker"),
    ],
)
def test_strategy_kind_from_tf_config_and_gpus(distribution: str, tf_config: dict, gpus: int, kind: str) -> None:
    assert choose_kind(distribution, tf_config, gpus) == kind


def test_chief_and_task_index_follow_tensorflows_convention() -> None:
    assert is_chief({}) and task_index({}) == 0
    assert is_chief(_cluster(3, 0)) and not is_chief(_cluster(3, 2)) and task_index(_cluster(3, 2)) == 2
    with_chief = _cluster(2, 0, chief=True)
    assert not is_chief(with_chief) and task_index(with_chief) == 1 and cluster_workers(with_chief) == 3
    assert is_chief({**with_chief, "task": {"type": "chief", "index": 0}})
    assert cluster_workers(parse_tf_config(json.dumps({"cluster": {"worker": ["a:1"], "evaluator": ["e:1"]}}))) == 1
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        parse_tf_config("{cluster")
    with pytest.raises(ValueError, match="trainer.distribution"):
        choose_kind("tpu", {}, 0)


def test_global_batch_learning_rate_and_evaluation_batch() -> None:
    assert scaled_learning_rate(0.001, 4, scale=True) == pytest.approx(0.004)
    assert scaled_learning_rate(0.001, 4, scale=False) == 0.001
    assert evaluation_batch(5, 1, 4) == (4, False)
    # 5 eval examples, 2 replicas x 2: a last batch of 1 would leave a replica empty; 6 gives [3, 2].
    assert evaluation_batch(5, 2, 2) == (6, False)
    for examples in range(1, 40):
        for replicas in (2, 3, 4):
            batch, drop = evaluation_batch(examples, replicas, 2)
            rest, size = examples % batch, batch // replicas
            assert drop or rest == 0 or rest > (replicas - 1) * size, (examples, replicas)


def test_tf_config_of_local_and_indexed_workers() -> None:
    config = tf_config({"worker": ["localhost:1", "localhost:2"]}, 1)
    assert config == {"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", "index": 1}}
    assert backend_name("auto", {}) == "local"
    assert backend_name("auto", {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == "indexed_job"
    assert backend_name("tfjob", {}) == "tfjob"


PLANS = """
import json, segflow
from segflow.train.distribute import make_plan
plans = {name: make_plan(name) for name in ("auto", "one_device", "mirrored")}
print(json.dumps({name: [plan.kind, plan.replicas, type(plan.strategy).__name__] for name, plan in plans.items()}))
"""


def _python(code: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **(env or {})}, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_auto_without_visible_gpus_is_one_device() -> None:
    """CUDA_VISIBLE_DEVICES="" hides every GPU: auto keeps the default strategy on one device."""
    env = {"CUDA_VISIBLE_DEVICES": "", "TF_CONFIG": json.dumps(_cluster(1))}
    done = _python(PLANS, env)
    assert done.returncode == 0, done.stderr[-3000:]
    plans = json.loads(done.stdout.strip().splitlines()[-1])
    assert plans["auto"][:2] == ["one_device", 1] and plans["auto"][2] != "OneDeviceStrategy"  # the default strategy
    assert plans["one_device"] == ["one_device", 1, "OneDeviceStrategy"]
    assert plans["mirrored"] == ["mirrored", 1, "MirroredStrategy"]  # one CPU device


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def prepared(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Examples and the TFT graph of the tiny dataset (the trainer's inputs)."""
    from segflow.components.example_gen import core as example_gen
    from segflow.components.schema_gen import core as schema_gen
    from segflow.components.statistics_gen import core as statistics_gen
    from segflow.components.transform import core as transform

    root = tmp_path_factory.mktemp("distribution")
    config = validate_config(tiny_raw_config(tiny_data))
    example_gen.run(config, root / "examples")
    statistics_gen.run(config, root / "examples", root / "statistics")
    schema_gen.run(config, root / "statistics", root / "schema")
    transform.run(config, root / "examples", root / "schema", root / "transform")
    return {"data": tiny_data, "examples": root / "examples", "transform": root / "transform"}


MIRRORED = """
import json, sys
from pathlib import Path
import segflow, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from segflow.config.experiment import ExperimentConfig
from segflow.components.trainer import core
config, examples, transform, out = sys.argv[1:]
final = core.run(ExperimentConfig.from_json(config), examples, transform, Path(out) / "model", Path(out) / "model_run")
print(json.dumps(final))
"""


def test_mirrored_on_two_logical_cpus_trains_one_epoch(prepared: dict[str, Path], tmp_path: Path) -> None:
    config = validate_config(tiny_raw_config(prepared["data"], batch=2, trainer={"distribution": "mirrored", "scale_learning_rate": True}))
    done = subprocess.run(
        [sys.executable, "-c", MIRRORED, config.to_json(), str(prepared["examples"]), str(prepared["transform"]), str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mirrored strategy, 2 replicas in sync; global batch 4 (2 per replica)" in done.stderr
    assert "1 epochs at learning rate 0.006" in done.stderr  # 0.003 x 2 replicas
    assert json.loads(done.stdout.strip().splitlines()[-1])["loss"] > 0
    assert (tmp_path / "model" / "Format-Serving" / "saved_model.pb").exists()
    assert len((tmp_path / "model_run" / "history.csv").read_text().splitlines()) == 2  # header + 1 epoch
    assert not (tmp_path / "backup").exists()


def _worker_processes(marker: Path) -> list[int]:
    """Live processes whose launcher scratch folder lies under `marker` (our workers only)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if "State:\tZ" in status:
            continue
        if any(item.startswith(f"{SCRATCH_ENV}={marker}".encode()) for item in environ):
            found.append(int(entry.name))
    return found


def _leftovers(folder: Path) -> list[str]:
    """Temporary entries a launch or an interrupted atomic write could leave (hidden names)."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob(".*"))


def _run_trainer(config: Any, prepared: dict[str, Path], out: Path) -> dict[str, Any]:
    from segflow.components.trainer import core as trainer

    return trainer.run(config, prepared["examples"], prepared["transform"], out / "model", out / "model_run")


def test_two_local_workers_train_identical_weights_and_only_the_chief_writes(prepared: dict[str, Path], tmp_path: Path) -> None:
    from segflow.train.multiworker import WORKERS_FILE

    config = validate_config(tiny_raw_config(prepared["data"], batch=2, stages=[{"epochs": 2, "learning_rate": 0.01}], trainer={"workers": 2}))
    final = _run_trainer(config, prepared, tmp_path)
    assert final["loss"] > 0 and "val_mean_iou" in final
    workers = json.loads((tmp_path / "model_run" / WORKERS_FILE).read_text())["workers"]
    assert [(worker["index"], worker["chief"]) for worker in workers] == [(0, True), (1, False)]
    assert workers[0]["weights_sha256"] == workers[1]["weights_sha256"]
    assert workers[0]["wrote"] == str(tmp_path / "model_run")
    assert workers[1]["removed"] and not Path(workers[1]["wrote"]).exists()  # the other worker's temporary outputs
    assert (tmp_path / "model" / "Format-Serving" / "saved_model.pb").exists()
    assert sorted(path.name for path in (tmp_path / "model_run" / "logs").iterdir()) == ["config", "train", "validation"]  # config: the trainer's settings as text
    assert len((tmp_path / "model_run" / "history.csv").read_text().splitlines()) == 3  # one history: the chief's
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "model_run"]  # backup/ removed, no launch folder
    assert not _leftovers(tmp_path) and not _worker_processes(tmp_path)


@pytest.mark.extended
def test_a_killed_worker_fails_clearly_and_leaves_nothing_behind(
    prepared: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Worker 1 kills itself after epoch 2 of 3: the launcher names it, stops the chief and
    cleans up; `backup/` stays, and the rerun resumes from it instead of starting over."""
    from segflow.components.trainer.core import BACKUP_FOLDER
    from segflow.train.multiworker import KILL_WORKER_ENV

    config = validate_config(tiny_raw_config(prepared["data"], batch=2, stages=[{"epochs": 3, "learning_rate": 0.01}], trainer={"workers": 2}))
    monkeypatch.setenv(KILL_WORKER_ENV, "1:2")
    started = time.monotonic()
    with pytest.raises(WorkerFailed) as failure:
        _run_trainer(config, prepared, tmp_path)
    message = str(failure.value)
    assert "worker 1 of 2" in message and "was killed by signal SIGKILL" in message and "the other workers were stopped" in message
    assert "Last lines of worker 1" in message and "killing this worker after epoch 2" in message
    assert time.monotonic() - started < 300
    assert not _worker_processes(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == [BACKUP_FOLDER]  # resumable state only
    assert not _leftovers(tmp_path), _leftovers(tmp_path)

    monkeypatch.delenv(KILL_WORKER_ENV)
    capfd.readouterr()
    _run_trainer(config, prepared, tmp_path)
    log = capfd.readouterr().err
    assert "[worker 0] Epoch 3/3" in log and "[worker 0] Epoch 1/3" not in log  # resumed after epoch 1 or 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "model_run"]
    assert not _leftovers(tmp_path) and not _worker_processes(tmp_path)


def sleep_for(seconds: float) -> None:
    """A worker entry for launcher tests (imported by `python -m segflow.cluster.workers worker`)."""
    time.sleep(seconds)


def fail_with(message: str) -> None:
    sys.exit(message)


def test_launcher_timeout_and_unknown_backend(tmp_path: Path) -> None:
    """Workers that outlive trainer.timeout_seconds are stopped and named; a backend that is
    not installed here is refused before anything starts."""
    sleeper = LaunchRequest("sleepers", f"{__name__}:sleep_for", {"seconds": 60}, workers=2, timeout_seconds=2, workdir=tmp_path)
    started = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"timed out after 2 s \(trainer.timeout_seconds\) with worker\(s\) 0, 1 still running"):
        launch(sleeper, "local")
    assert time.monotonic() - started < 30
    assert not _worker_processes(tmp_path) and not list(tmp_path.iterdir())
    with pytest.raises(WorkerFailed, match="'slurm' backend, which this installation does not have"):
        launch(sleeper, "slurm")
    failing = LaunchRequest("failing", f"{__name__}:fail_with", {"message": "boom"}, workers=2, timeout_seconds=60, workdir=tmp_path)
    with pytest.raises(WorkerFailed, match=r"worker \d of 2 \(pid \d+\) exited with code 1") as failure:
        launch(failing, "local")
    assert "boom" in str(failure.value)
    assert not _worker_processes(tmp_path) and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_segflow_run_with_two_workers_is_blessed(tiny_data: Path, tmp_path: Path) -> None:
    """The whole DAG through the CLI with trainer.workers: 2 (MultiWorkerMirroredStrategy on
    2 local processes): both finish with identical weights, only the chief wrote, blessed."""
    from segflow.cli import main

    raw = tiny_raw_config(
        tiny_data,
        batch=2,
        stages=[{"epochs": 16, "learning_rate": 0.01}],  # eval mean IoU about 0.33 (0.26 after 10 epochs)
        trainer={"workers": 2},
        export=["saved_model"],
        evaluation={"min_mean_iou": 0.2},  # untrained: about 0.1
    )
    path = tmp_path / "two-workers.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "-o", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["components"]["trainer"]["status"] == "succeeded"
    assert summary["blessed"] is True, summary["metrics"]["eval"]["mean_iou"]
    trainer = tmp_path / "run" / "trainer"
    workers = json.loads((trainer / "model_run" / "workers.json").read_text())["workers"]
    assert len(workers) == 2 and workers[0]["weights_sha256"] == workers[1]["weights_sha256"]
    assert [worker["chief"] for worker in workers] == [True, False] and not Path(workers[1]["wrote"]).exists()
    assert (trainer / "model" / "Format-Serving" / "saved_model.pb").exists()
    assert not [name for name in _leftovers(tmp_path / "run") if "launch" in name or name.startswith("trainer/.")]
    assert not _worker_processes(tmp_path)


def test_two_worker_pods_of_an_indexed_job_train_through_the_shared_volume(prepared: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.launcher indexed_job against the fake Kubernetes API (tests/cluster/k8s_fake.py): two
    pods train under MultiWorkerMirroredStrategy, the chief's model comes back through the
    staging folder on the PVC into the step's outputs, and the staging folder, the Job, the
    Service and the pods are gone afterwards."""
    from segflow.train.multiworker import WORKERS_FILE
    from tests.cluster.k8s_fake import FakeKubernetes

    pvc = tmp_path / "pvc"
    pvc.mkdir()
    kubernetes = {"namespace": "team-a", "pvc": "segflow-artifacts", "pvc_mount_path": str(pvc)}
    raw = tiny_raw_config(prepared["data"], batch=2, stages=[{"epochs": 2, "learning_rate": 0.01}], trainer={"workers": 2, "launcher": "indexed_job"}, kubernetes=kubernetes)
    config = validate_config(raw)
    with FakeKubernetes(tmp_path / "cluster") as fake:
        monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig()))
        out = tmp_path / "step"
        final = _run_trainer(config, prepared, out)
        assert not fake.objects and not fake.pods and not fake.running_processes()
    assert final["loss"] > 0 and "val_mean_iou" in final
    workers = json.loads((out / "model_run" / WORKERS_FILE).read_text())["workers"]
    assert [(worker["index"], worker["chief"]) for worker in workers] == [(0, True), (1, False)]
    assert workers[0]["weights_sha256"] == workers[1]["weights_sha256"] and workers[1]["removed"]
    assert (out / "model" / "Format-Serving" / "saved_model.pb").exists()
    assert len((out / "model_run" / "history.csv").read_text().splitlines()) == 3
    assert list((pvc / ".segflow-launch").iterdir()) == []  # the staging folder went after the copy
