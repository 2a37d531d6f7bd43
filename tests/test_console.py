"""The console of `segflow run`: segflow's lines and progress by default, log files with the rest."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import yaml

from segflow.cli import main
from segflow.console import PROGRESS_MARK, NativeOutput, Progress, Renderer, parse_records, progress

KFP_LINES = ("Executing task", "Got executor_input", "Streamed logs", "finished with status", "Artifact(", "[KFP Executor")


def _config(tiny_data: Path, tmp_path: Path) -> Path:
    from tests.conftest import tiny_raw_config

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_raw_config(tiny_data, push={"registry": str(tmp_path / "registry")}, export=["saved_model"])))
    return path


def check_default_console(out: str, err: str, run: Path) -> None:
    """segflow's lines, per-epoch lines and a final line per progress step; kfp.local's
    banners, executor input and artifact dumps only in the run folder's log.txt; each
    component's whole output in its own folder's log.txt. Called by test_pipeline's full
    run through the CLI (one kfp.local run of the whole DAG serves both tests)."""
    console = out + err
    assert not [line for line in console.splitlines() if any(marker in line for marker in KFP_LINES)]
    assert PROGRESS_MARK not in console and "I0000" not in console
    lines = [line for line in out.splitlines() + err.splitlines() if line.startswith("[segflow] ")]
    assert "[segflow] trainer: started" in lines
    assert any(re.fullmatch(r"\[segflow\] trainer: epoch 1/1: loss \S+, mean_iou \S+, val_loss \S+, val_mean_iou \S+, lr \S+ \(\S+ s\)", line) for line in lines)
    eval_examples = json.loads((run / "summary.json").read_text())["counts"]["eval_examples"]
    assert any(re.fullmatch(rf"\[segflow\] evaluator: eval split: {eval_examples}/{eval_examples} images in \S+ s, \S+ images/s", line) for line in lines)
    for step in ("example_gen: decode, check, serialize", "statistics_gen: statistics", "exporter: saved_model parity"):
        assert any(line.startswith(f"[segflow] {step}: ") and " in " in line for line in lines), step
    assert "status: succeeded" in out

    summary = json.loads((run / "summary.json").read_text())
    for name in summary["components"]:
        log = (run / name / "log.txt").read_text()
        assert f"[segflow] {name}: started" in log and f"[segflow] {name}: finished in" in log, name
    trainer_log = (run / "trainer" / "log.txt").read_text()
    assert re.search(r"^\d+/\d+ - \d+m?s - loss: ", trainer_log, re.MULTILINE)  # Keras' own epoch line: the log only
    assert PROGRESS_MARK in (run / "evaluator" / "log.txt").read_text()
    transcript = (run / "log.txt").read_text()
    assert "Executing task" in transcript and "Got executor_input" in transcript and "[segflow] pusher: finished in" in transcript


# A second kfp.local run (40-70 s) for the --verbose switch: with make test-slow; the default console test runs the DAG once.
@pytest.mark.slow
def test_verbose_console_shows_kfp_output(tiny_data: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["validate", str(_config(tiny_data, tmp_path)), "-o", str(run), "--verbose"]) == 0
    out = capfd.readouterr().out
    assert "Executing task" in out and "Got executor_input" in out and "[segflow] example_gen: started" in out
    assert PROGRESS_MARK not in out  # drawn, not relayed raw
    assert "[segflow] example_validator: started" in (run / "example_validator" / "log.txt").read_text()


def test_without_a_terminal_a_step_prints_a_line_every_quarter_and_a_final_line() -> None:
    sink = io.StringIO()
    renderer = Renderer(sink, tty=False)
    renderer.record({"step": "predict", "total": 100, "unit": "images"})
    for _ in range(20):
        renderer.record({"step": "predict", "add": 5})
    renderer.record({"step": "predict", "end": True})
    lines = sink.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines[:3]] == [f"[segflow] predict: {done}/100 images" for done in (25, 50, 75)]
    assert lines[3].startswith("[segflow] predict: 100/100 images in ") and len(lines) == 4


def test_on_a_terminal_a_step_is_one_tqdm_bar_with_lines_above_it() -> None:
    sink = io.StringIO()
    renderer = Renderer(sink, tty=True)
    renderer.record({"step": "evaluator: eval split", "total": None, "unit": "images"})  # a Beam worker's, before the total
    renderer.record({"step": "evaluator: eval split", "total": 8, "unit": "images"})
    renderer.record({"step": "evaluator: eval split", "add": 3})
    renderer.line("[segflow] evaluator: a line")
    renderer.record({"step": "evaluator: eval split", "end": True, "done": 8})
    text = sink.getvalue()
    assert "[segflow] evaluator: a line\n" in text
    assert text.rstrip().endswith("]") and "8/8" in text.split("\r")[-1] and "100%" in text.split("\r")[-1]


def test_inside_a_component_progress_is_a_few_records(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Relayed line by line, a step is a start record, at most one record per RECORD_SECONDS
    and an end record, not one line per item."""
    monkeypatch.setenv("SEGFLOW_PROGRESS_RELAY", "1")
    assert list(progress(range(1000), "exporter: x")) == list(range(1000))
    records = [json.loads(line.removeprefix(PROGRESS_MARK)) for line in capsys.readouterr().out.splitlines()]
    assert records[0] == {"step": "exporter: x", "total": 1000, "unit": "examples"} and records[-1] == {"step": "exporter: x", "end": True}
    assert sum(record.get("add", 0) for record in records) == 1000 and len(records) <= 4


def test_records_sharing_a_line_are_all_read_and_a_torn_one_is_dropped() -> None:
    """Beam's workers write into one pipe: two records can share a line, or another process's
    text can cut one; neither may stop the run (CI, stop 15: the evaluator's records did)."""
    first, second = {"step": "evaluator: eval", "add": 3}, {"step": "evaluator: eval", "end": True, "done": 9}
    shared = f"    {PROGRESS_MARK}{json.dumps(first)}{PROGRESS_MARK}{json.dumps(second)}"
    assert parse_records(shared) == [first, second]
    torn = f"{PROGRESS_MARK}{{\"step\": \"evalu{PROGRESS_MARK}{json.dumps(second)} trailing text"
    assert parse_records(torn) == [second]
    assert parse_records("[segflow] evaluator: a line") is None


def test_beam_workers_report_deltas_and_the_end_has_the_final_count(capsys: pytest.CaptureFixture[str]) -> None:
    main_counter = Progress("statistics_gen: statistics", 10)
    worker = Progress("statistics_gen: statistics")  # counts whose records never came (throttled, then stopped)
    worker.add(4)
    main_counter.end(done=10)
    assert re.fullmatch(r"\[segflow\] statistics_gen: statistics: 10/10 examples in \S+ s, \S+ examples/s\n", capsys.readouterr().err)


def test_native_output_goes_to_the_run_folder_log_first(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    import os

    (tmp_path / "log.txt").write_text("transcript\n")
    with NativeOutput() as native:
        os.write(2, b"I0000 native noise\n")
        print("[segflow] shown")
        native.keep(tmp_path)
    out, err = capfd.readouterr()
    assert out == "[segflow] shown\n" and err == ""
    assert (tmp_path / "log.txt").read_text() == "I0000 native noise\ntranscript\n"
