"""`segflow run CONFIG --containers`: every component in the segflow image, through kfp.local's
DockerRunner, against a Docker daemon or podman's Docker-compatible API service.

The image is built by containers/build.sh (`segflow:<version>`); the components' declared
`base_image` (segflow.cluster.kfp_base.BASE_IMAGE, the registry name a cluster pulls) is replaced by
it, as the SubprocessRunner ignores it. Mounts, at the same absolute paths inside as outside:
kfp.local's pipeline root (read-write, done by DockerRunner itself), the dataset folders and
the validation baselines (read-only) and a local model registry (read-write). Containers run
as the invoking user's uid:gid, so the run folder's files belong to that user as they do after
an in-process run; the image's own user (uid 1000, non-root) is what clusters run.

Auto-remove: kfp.local's `run_docker_container` starts every container with `auto_remove=True`
and reads its logs and exit status afterwards. A short task is often gone by then. A 404 is
caught by kfp.local, which then assumes exit status 0: with podman 4.3 here a component that
exits with status 3 was reported SUCCESS. While the removal is under way podman answers HTTP
500 ("container ... does not exist in database") instead of 404, which the docker SDK raises
as a plain APIError and which breaks the run. `_run_container` replaces that one function for the duration of a
containerized run (`_kfp_runs_containers_with`): it starts the container without auto-remove,
streams its logs, waits for the real exit status and then removes the container itself. So a
task's status is never guessed, and nothing depends on how the engine reports a missing
container. The rest of kfp.local (task handler, volume mounts, executor input/output) is used
as it is; kfp is pinned (constraints.txt) and tests/cluster/test_containers.py checks the replaced
function's call signature.

Resource limits: through its API, rootful podman gives a container RLIMIT_NOFILE 1048576 and a
large RLIMIT_NPROC unless told otherwise; without CAP_SYS_RESOURCE (as in some VMs and CI
sandboxes) runc cannot raise the limits that far and the container does not start ("error
setting rlimits ... operation not permitted"). With podman the containers therefore get this
process's open-files limit and its process limit capped at the kernel's pid_max (the limit
podman's conmon runs with), values runc can always set.
"""
from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

from segflow import __version__
from segflow.config.component_config import locations
from segflow.config.experiment import ExperimentConfig
from segflow.utils import storage

DEFAULT_IMAGE = f"segflow:{__version__}"
"""What containers/build.sh tags the CPU image."""

PODMAN_SOCKET = "/run/podman/podman.sock"
DOCKER_SOCKET = "/var/run/docker.sock"

READ_ONLY_LOCATIONS = ("dataset.images", "dataset.masks", "validation.schema", "validation.baseline_statistics")
WRITABLE_LOCATIONS = ("push.registry",)

# Passed on to the containers when set, so s3:// and gs:// locations work as in-process.
PASSED_ENVIRONMENT = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION",
    "SEGFLOW_SEED",
)


class ContainerEngineError(RuntimeError):
    """No Docker daemon or podman to run the containers, or the image is missing."""


def _answers(url: str) -> bool:
    import docker

    try:
        client = docker.DockerClient(base_url=url, timeout=10)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False


def _socket_url(path: str) -> str:
    return f"unix://{path}"


@contextlib.contextmanager
def engine_api() -> Iterator[str]:
    """The Docker API URL to use: DOCKER_HOST if set, else a Docker daemon's socket, else
    podman's API service socket, which is started here (`podman system service --time=0`, with
    the runc runtime) when nothing answers on it, and stopped when the context ends."""
    if os.environ.get("DOCKER_HOST"):
        yield os.environ["DOCKER_HOST"]
        return
    for path in (DOCKER_SOCKET, PODMAN_SOCKET):
        if os.path.exists(path) and _answers(_socket_url(path)):
            yield _socket_url(path)
            return
    podman = shutil.which("podman")
    if podman is None:
        raise ContainerEngineError("--containers needs a Docker daemon (DOCKER_HOST or /var/run/docker.sock) or podman; neither was found")
    socket = PODMAN_SOCKET if os.geteuid() == 0 else f"{os.environ.get('XDG_RUNTIME_DIR', '/tmp')}/podman/podman.sock"
    Path(socket).parent.mkdir(parents=True, exist_ok=True)
    service = subprocess.Popen(
        [podman, "--runtime", "runc", "system", "service", "--time=0", _socket_url(socket)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not _answers(_socket_url(socket)):
            if service.poll() is not None or time.monotonic() > deadline:
                raise ContainerEngineError(f"podman system service did not answer on {socket}")
            time.sleep(0.2)
        yield _socket_url(socket)
    finally:
        service.terminate()
        try:
            service.wait(timeout=10)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()


def _run_container(client: Any, image: str, command: list[str], volumes: dict[str, Any], *, run_image: str, **run_args: Any) -> int:
    """Stands in for kfp.local.docker_task_handler.run_docker_container (same keyword call):
    runs `command` in `run_image` (not the component's declared `image`) without auto-remove,
    prints its logs, and returns its real exit status; the container is removed afterwards."""
    import docker

    del image  # the component's registry name; the locally built image runs instead
    try:
        client.images.get(run_image)
    except docker.errors.ImageNotFound:
        try:
            client.images.pull(run_image)
        except docker.errors.APIError as error:
            raise ContainerEngineError(f"image {run_image} is not available ({error}); build it with containers/build.sh") from error
    container = client.containers.create(image=run_image, command=command, volumes=volumes, auto_remove=False, **run_args)
    try:  # created, then started here: a container that fails to start is removed too
        container.start()
        for chunk in container.logs(stream=True, follow=True):
            print(chunk.decode(errors="replace"), end="")
        return int(container.wait()["StatusCode"])
    finally:
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True)


@contextlib.contextmanager
def _kfp_runs_containers_with(image: str) -> Iterator[None]:
    """kfp.local's DockerTaskHandler calls `run_docker_container` from its module at run time;
    within this context that is `_run_container` (see the module docstring)."""
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = functools.partial(_run_container, run_image=image)
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original


def _ulimits() -> list[Any]:
    """nofile and nproc limits for podman containers that runc can set (see the module docstring)."""
    from docker.types import Ulimit

    nofile_soft, nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc_soft, nproc_hard = resource.getrlimit(resource.RLIMIT_NPROC)
    try:
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        pid_max = 32768

    def capped(value: int, cap: int) -> int:
        return cap if value == resource.RLIM_INFINITY else min(value, cap)

    nproc_hard = capped(nproc_hard, pid_max)
    return [
        Ulimit(name="nofile", soft=capped(nofile_soft, nofile_hard), hard=capped(nofile_hard, 1 << 20)),
        Ulimit(name="nproc", soft=capped(nproc_soft, nproc_hard), hard=nproc_hard),
    ]


def _local_paths(config: ExperimentConfig, keys: tuple[str, ...]) -> list[str]:
    found = locations(config)
    return sorted({os.path.abspath(found[key]) for key in keys if key in found and storage.is_local(found[key])})


def mounts(config: ExperimentConfig) -> list[Any]:
    """Bind mounts for the config's local locations (made absolute by the caller): inputs
    read-only, the registry read-write (created if missing), at the same paths inside."""
    from docker.types import Mount

    result = [Mount(target=path, source=path, type="bind", read_only=True) for path in _local_paths(config, READ_ONLY_LOCATIONS) if os.path.exists(path)]
    for path in _local_paths(config, WRITABLE_LOCATIONS):
        os.makedirs(path, exist_ok=True)
        result.append(Mount(target=path, source=path, type="bind", read_only=False))
    return result


@contextlib.contextmanager
def docker_runner(config: ExperimentConfig, image: str = DEFAULT_IMAGE) -> Iterator[Any]:
    """A kfp.local DockerRunner for `config` (its locations already absolute), valid inside the
    context: the engine's API is reachable through DOCKER_HOST and tasks run in `image`."""
    from kfp import local

    with engine_api() as url:
        import docker

        client = docker.DockerClient(base_url=url)
        try:
            client.images.get(image)
            podman = "podman" in str(client.version().get("Components", [{}])[0].get("Name", "")).lower()
        except docker.errors.ImageNotFound as error:
            raise ContainerEngineError(f"image {image} not found; build it with containers/build.sh") from error
        finally:
            client.close()
        environment = {"HOME": "/tmp", **{name: os.environ[name] for name in PASSED_ENVIRONMENT if name in os.environ}}
        run_args: dict[str, Any] = {
            "mounts": mounts(config),
            "user": f"{os.getuid()}:{os.getgid()}",
            "network_mode": "host",
            "environment": environment,
        }
        if podman:
            run_args["runtime"] = "runc"
            run_args["ulimits"] = _ulimits()
        previous = os.environ.get("DOCKER_HOST")
        os.environ["DOCKER_HOST"] = url  # kfp.local's task handler calls docker.from_env()
        try:
            with _kfp_runs_containers_with(image):
                yield local.DockerRunner(**run_args)
        finally:
            if previous is None:
                os.environ.pop("DOCKER_HOST", None)
            else:
                os.environ["DOCKER_HOST"] = previous
