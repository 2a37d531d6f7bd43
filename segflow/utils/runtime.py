"""What every component shares at run time: progress lines, a run record, a log file, Beam options."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from segflow.console import LOG_FILE, MARK, RELAY_ENV
from segflow.utils.io import read_json, write_json

T = TypeVar("T")
RECORD_FILE = "component.json"
STRAGGLER_SECONDS = 10.0  # how long the log waits for a leftover Beam worker that still holds the output


def log(message: str) -> None:
    print(f"{MARK}{message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _output_to_log(path: Path) -> Iterator[None]:
    """Everything this process and its children write to stdout/stderr (Python, TensorFlow's
    C++ logging, Beam workers) goes to `path` and on to the original stdout, where kfp.local
    relays it and the console keeps segflow's lines (pipelines.local). At the descriptor
    level, since TensorFlow's native logging bypasses sys.stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 1)
    os.dup2(write, 2)
    os.close(write)

    def pump() -> None:
        with open(path, "ab") as file:
            while chunk := os.read(read, 65536):
                file.write(chunk)
                file.flush()
                os.write(saved_out, chunk)

    thread = threading.Thread(target=pump, name="segflow-log", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)  # the pipe's last write ends close: the pump reads to its end
        os.dup2(saved_err, 2)
        os.close(saved_err)
        thread.join(STRAGGLER_SECONDS)
        if not thread.is_alive():  # else a straggler still writes: leave the pump its descriptors
            os.close(read)
            os.close(saved_out)


@contextlib.contextmanager
def environment_variable(name: str, value: str) -> Iterator[None]:
    """`name=value` in this process's environment (and so in every process it starts) for the
    block; the previous value, or its absence, afterwards."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def execute(name: str, record_dir: str | os.PathLike[str], fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one component's core with start/end/duration lines, its whole output in `log.txt`
    and a `component.json` record (status, seconds, error) that the local runner turns into
    summary.json."""
    Path(record_dir).mkdir(parents=True, exist_ok=True)
    # progress as records for the console; Beam workers inherit it
    with environment_variable(RELAY_ENV, "1"), _output_to_log(Path(record_dir) / LOG_FILE):
        return _execute(name, record_dir, fn, *args, **kwargs)


def _execute(name: str, record_dir: str | os.PathLike[str], fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    # Beam, TFT and the KFP executor log every worker handshake at INFO; keep progress readable.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    started = time.perf_counter()
    log(f"{name}: started")
    try:
        result = fn(*args, **kwargs)
    except BaseException as error:
        seconds = time.perf_counter() - started
        write_json(Path(record_dir) / RECORD_FILE, {"component": name, "status": "failed", "seconds": round(seconds, 2), "error": f"{type(error).__name__}: {error}"})
        log(f"{name}: FAILED after {seconds:.1f} s: {type(error).__name__}: {error} (traceback in its folder's {LOG_FILE})")
        traceback.print_exc()
        raise
    seconds = time.perf_counter() - started
    write_json(Path(record_dir) / RECORD_FILE, {"component": name, "status": "succeeded", "seconds": round(seconds, 2)})
    log(f"{name}: finished in {seconds:.1f} s")
    return result


def read_record(record_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(record_dir) / RECORD_FILE
    return read_json(path) if path.exists() else None


def beam_options(beam: Any, temp_dir: str | os.PathLike[str]) -> Any:
    """PipelineOptions from the config's `beam` section (segflow.config.experiment.BeamConfig): the
    runner (DirectRunner by default, inside this process) and its options."""
    from segflow.utils.beam_runners import pipeline_options

    return pipeline_options(beam.running_mode, beam.num_workers, temp_dir, beam.runner, dict(beam.options))
