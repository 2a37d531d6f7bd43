"""SIGTERM to `segflow run` stops the component subprocesses too (kfp.local's outlive their
parent: an orphaned trainer would go on training into the run folder)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from segflow.pipelines.local import _descendants
from tests.conftest import tiny_raw_config

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _wait_for(condition: object, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_sigterm_stops_every_descendant_and_exits_143() -> None:
    program = textwrap.dedent(
        """
        import subprocess
        from segflow.pipelines.local import _components_stop_with_run
        with _components_stop_with_run():
            subprocess.Popen(["sh", "-c", "sleep 60 & wait"]).wait()
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", program])
    try:
        _wait_for(lambda: len(_descendants(parent.pid)) == 2, 30)  # sh and its sleep
        tree = _descendants(parent.pid)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 128 + signal.SIGTERM
        _wait_for(lambda: not any(_running(pid) for pid in tree), 10)
    finally:
        parent.kill()


def test_sigterm_to_segflow_run_stops_the_running_component(tiny_data: Path, tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_raw_config(tiny_data)))
    command = [sys.executable, "-m", "segflow.cli", "run", str(tmp_path / "tiny.yaml"), "-o", str(tmp_path / "run")]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def component_running() -> bool:
        return any(b"executor_main" in _cmdline(pid) for pid in _descendants(run.pid))

    try:
        _wait_for(component_running, 240)
        tree = _descendants(run.pid)
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 128 + signal.SIGTERM
        _wait_for(lambda: not any(_running(pid) for pid in tree), 30)
        assert not (tmp_path / "run" / "summary.json").exists()
    finally:
        run.kill()
