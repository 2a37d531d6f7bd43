"""What every component shares at run time: progress lines, a run record, Beam options."""
from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, TypeVar

from segflow.io import read_json, write_json

T = TypeVar("T")
RECORD_FILE = "component.json"


def log(message: str) -> None:
    print(f"[segflow] {message}", file=sys.stderr, flush=True)


def execute(name: str, record_dir: str | os.PathLike[str], fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one component's core with start/end/duration lines and a `component.json` record
    (status, seconds, error) that the local runner turns into summary.json."""
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
        log(f"{name}: FAILED after {seconds:.1f} s: {type(error).__name__}: {error}")
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
    """PipelineOptions from the config's `beam` section (segflow.config.BeamConfig): the
    runner (DirectRunner by default, inside this process) and its options."""
    from segflow.beam_runners import pipeline_options

    return pipeline_options(beam.running_mode, beam.num_workers, temp_dir, beam.runner, dict(beam.options))
