"""Beam runners and their options: checked at config time by Beam's own option classes,
turned into `PipelineOptions` when a data component builds its Beam pipeline.

`beam.runner` picks the runner (DirectRunner, the default, runs inside the step's process
or pod); `beam.options` are Beam's pipeline options by their flag names. A name that no
Beam option class declares, a value its parser rejects, a value Beam's validator rejects
and a runner's missing required option are config errors, before any work starts.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Any

RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner")

# Options a runner cannot do without, beyond what Beam's validator checks when the job starts:
# Dataflow needs a project, a region and a gs:// temp_location (Beam would otherwise create a
# bucket over the network); Flink and Spark would start a cluster inside the step's pod.
REQUIRED = {
    "DirectRunner": (),
    "DataflowRunner": ("project", "region", "temp_location"),
    "FlinkRunner": ("flink_master",),
    "SparkRunner": ("spark_master_url",),
}

# Set by segflow itself: beam.runner, beam.running_mode and beam.num_workers.
RESERVED = {"runner": "beam.runner", "direct_running_mode": "beam.running_mode", "direct_num_workers": "beam.num_workers"}


def _pipeline_options(options: dict[str, Any]) -> Any:
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions.from_dictionary(options)


def _parse_errors(options: dict[str, Any]) -> tuple[Any, list[str]]:
    """(PipelineOptions, errors): unknown names and values Beam's argument parser rejects."""
    import logging

    beam_log = logging.getLogger("apache_beam.options.pipeline_options")
    parsed, errors, stderr = _pipeline_options(options), [], io.StringIO()
    level = beam_log.level
    beam_log.setLevel(logging.ERROR)  # "Discarding unparseable args": reported below, by name
    try:
        with contextlib.redirect_stderr(stderr):
            known = parsed.get_all_options(retain_unknown_options=False)
            retained = parsed.get_all_options(retain_unknown_options=True)
    except SystemExit:
        message = stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else "not valid"
        return parsed, [message.split("error: ", 1)[-1]]
    finally:
        beam_log.setLevel(level)
    unknown = sorted(name for name in retained if name not in known)
    errors += [f"{name}: not an option of any Beam option class" for name in unknown]
    return parsed, errors


def option_errors(runner: str, options: dict[str, Any]) -> list[str]:
    """Every problem with `options` for `runner`, one message each (empty: valid)."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator

    if runner not in RUNNERS:
        return [f"unknown runner {runner!r}; one of {', '.join(RUNNERS)}"]
    errors = [f"{name}: set by {key} (not in beam.options)" for name, key in RESERVED.items() if name in options]
    parsed, parse_errors = _parse_errors(options)
    errors += parse_errors
    if parse_errors:
        return errors
    given = parsed.get_all_options(drop_default=True)
    missing = [f"{name}: required by {runner}" for name in REQUIRED[runner] if given.get(name) in (None, "")]
    if missing:
        return errors + missing
    # Beam's validator with no runner: every option class's own checks, without the
    # service-runner checks that reach Google Cloud over the network.
    errors += PipelineOptionsValidator(parsed, None).validate()
    if runner == "DataflowRunner":
        validator = PipelineOptionsValidator(parsed, None)
        cloud = parsed.view_as(GoogleCloudOptions)
        for name in ("temp_location", "staging_location"):
            if getattr(cloud, name, None):
                errors += validator.validate_gcs_path(cloud, name)
        errors += validator.validate_cloud_options(cloud)
    return errors


def check_options(runner: str, options: dict[str, Any]) -> None:
    """ValueError listing every problem (the config loader names the key path `beam`)."""
    errors = option_errors(runner, options)
    if errors:
        raise ValueError(f"Beam options for {runner}: " + "; ".join(errors))


def disable_time_based_flush() -> None:
    """Make the DirectRunner's in-process (multi_threading) SDK workers flush their output by
    size only, as Beam's own SDK worker process does (`sdk_worker_main`: 0 ms by default).

    Beam 2.77 starts those workers with a 1000 ms time-based flush, whose flusher thread runs
    `callback(get())` and then `_clear()` while the bundle's thread keeps encoding elements into
    the same buffer without the flush lock (`DataOutputOperation.process`): an element written in
    between is cleared without being sent, and the next GroupByKey silently misses it. ExampleGen
    lost 2-3 of CamVid's 367 pairs in most runs this way. 0 makes `ClosableOutputStream.create`
    build the size-based stream, which only the bundle's thread flushes."""
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = 0


def pipeline_options(running_mode: str, num_workers: int, temp_dir: str | os.PathLike[str], runner: str = "DirectRunner", options: dict[str, Any] | None = None) -> Any:
    """The PipelineOptions of a data component's Beam pipeline. DirectRunner: `running_mode`
    and `num_workers` (0: one worker per available core), threads without Beam's racy
    time-based output flush (`disable_time_based_flush`); any runner: `options` on top,
    and `temp_dir` as temp_location unless the options name one (Dataflow needs gs://)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    settings: dict[str, Any] = {"runner": runner, "temp_location": str(temp_dir)}
    if runner == "DirectRunner":
        if running_mode == "multi_threading":
            disable_time_based_flush()
        workers = 1 if running_mode == "in_memory" else num_workers or len(os.sched_getaffinity(0))
        settings.update(direct_running_mode=running_mode, direct_num_workers=workers)
    settings.update(options or {})
    # flags=[]: not sys.argv, the KFP executor's arguments are not Beam flags.
    return PipelineOptions(flags=[], **settings)
