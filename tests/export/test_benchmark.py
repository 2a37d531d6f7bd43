"""segflow benchmark and the Exporter's stored table: every built format measured, the JSON
and markdown columns, round-robin interleaving, the slower-than-fp32 note (fake timings,
never wall-clock asserts), and the class-stratified calibration set."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest

from segflow.export import benchmark as bench
from segflow.cli import main
from segflow.components.exporter import core as exporter
from segflow.data.examples import SegmentationExample
from segflow.utils.registry import EXPORT_FORMATS
from segflow.export.serving import SERVING_SUBDIR, ServingSpec
from segflow.export.exporters import BENCHMARK_FILE

FAST = bench.BenchmarkSettings(threads=(1, 2), runs=2, warmup=0)


@pytest.fixture(scope="module")
def built(trained: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    config = trained["config"]
    config = config.model_copy(update={"export": config.export.model_copy(update={"formats": EXPORT_FORMATS.names(), "calibration_examples": 8})})
    out = tmp_path_factory.mktemp("bench") / "exports"
    return exporter.run(config, trained["examples"], trained["model"], out), out


def _present(results: dict[str, Any]) -> list[str]:
    return [name for name in EXPORT_FORMATS.names() if results[name].get("status") != "skipped"]


def test_benchmark_measures_every_built_format(built: tuple[dict, Path]) -> None:
    results, out = built
    present = _present(results)
    assert {"saved_model", "tflite_fp32", "tflite_dynamic", "tflite_int8", "onnx"} <= set(present)
    table = bench.benchmark(out, FAST)
    assert list(table["formats"]) == present
    for name, row in table["formats"].items():
        assert row["bytes"] == results[name]["bytes"] and row["mean_iou"] == results[name]["mean_iou"]
        columns = ["1", "2"] if EXPORT_FORMATS.get(name).runtime not in bench.FIXED_POOL_RUNTIMES else ["2"]
        assert list(row["latency"]) == columns, name
        for cell in row["latency"].values():
            assert set(cell) == {"median_ms", "mean_ms", "p90_ms", "vs_tflite_fp32"} and cell["median_ms"] > 0
    assert table["formats"]["tflite_fp32"]["latency"]["1"]["vs_tflite_fp32"] == 1.0
    assert table["formats"]["tflite_fp32"]["bytes_vs_tflite_fp32"] == 1.0


def test_markdown_has_a_row_and_the_columns_per_format(built: tuple[dict, Path]) -> None:
    results, out = built
    text = bench.markdown(bench.benchmark(out, bench.BenchmarkSettings(threads=(1,), runs=1, warmup=0), ["tflite_fp32", "tflite_int8"]))
    header = text.splitlines()[0]
    for column in ("export", "MB", "bytes vs fp32", "mean IoU", "1 thr mean / p90 ms", "1 thr vs fp32", "note"):
        assert f" {column} |" in header
    assert [line.split("|")[1].strip() for line in text.splitlines()[2:4]] == ["tflite_fp32", "tflite_int8"]


def test_exporter_stores_the_table_in_the_run(built: tuple[dict, Path]) -> None:
    results, out = built
    stored = json.loads((out / BENCHMARK_FILE).read_text())
    assert list(stored["formats"]) == _present(results) and stored["runs"] == exporter.BENCHMARK_SETTINGS.runs
    assert "| tflite_int8 |" in (out / exporter.BENCHMARK_MARKDOWN).read_text()
    for name in _present(results):
        assert results[name]["latency"] == stored["formats"][name]["latency"]
    assert exporter.read_exports(out)["tflite_fp32"]["latency"] == results["tflite_fp32"]["latency"]


def test_cli_prints_the_json_table(built: tuple[dict, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _, out = built
    code = main(["benchmark", str(out), "--format", "tflite_fp32", "--max-threads", "1", "--runs", "1", "--warmup", "0", "--json", "-o", str(tmp_path)])
    assert code == 0
    table = json.loads(capsys.readouterr().out)
    assert list(table["formats"]) == ["tflite_fp32"] and table["threads"] == [1]
    assert (tmp_path / "benchmark.json").exists() and (tmp_path / "benchmark.md").exists()
    assert main(["benchmark", str(tmp_path)]) == 2
    assert "neither a run folder" in capsys.readouterr().err


def test_runs_are_interleaved_round_robin() -> None:
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    ticks = iter(range(100))
    seconds = bench.interleave(calls, runs=3, warmup=1, clock=lambda: float(next(ticks)))
    assert order == ["a", "b", "c"] * 4  # one warm-up round, then three timed rounds, formats in turn
    assert seconds == {"a": [1.0, 1.0, 1.0], "b": [1.0, 1.0, 1.0], "c": [1.0, 1.0, 1.0]}


def _fake_exports() -> dict[str, Any]:
    return {
        name: {"bytes": size, "quantization": name, "runtime": "LiteRT", "mean_iou": 0.7, "status": "passed"}
        for name, size in (("tflite_fp32", 1000), ("tflite_fp16", 500), ("tflite_dynamic", 250))
    }


def test_a_format_slower_than_fp32_gets_a_note() -> None:
    seconds = {
        "tflite_fp32": {1: [0.080, 0.085, 0.090], 2: [0.045, 0.046, 0.047]},
        "tflite_fp16": {1: [0.081, 0.086, 0.091], 2: [0.045, 0.046, 0.048]},  # within the noise margin
        "tflite_dynamic": {1: [0.190, 0.196, 0.200], 2: [0.160, 0.163, 0.170]},
    }
    table = bench.report(_fake_exports(), seconds, bench.BenchmarkSettings(threads=(1, 2), runs=3, warmup=0))
    rows = table["formats"]
    assert rows["tflite_dynamic"]["latency"]["1"]["vs_tflite_fp32"] == pytest.approx(0.196 / 0.085, abs=1e-3)
    assert rows["tflite_dynamic"]["note"] == "slower than tflite_fp32 on this runtime and CPU: 2.31x at 1 thread, 3.54x at 2 threads (median latency)"
    assert "note" not in rows["tflite_fp16"] and "note" not in rows["tflite_fp32"]
    assert rows["tflite_dynamic"]["bytes_vs_tflite_fp32"] == 0.25
    assert "slower than tflite_fp32" in bench.markdown(table).splitlines()[4]


def test_the_note_reaches_exports_json(tmp_path: Path) -> None:
    results = _fake_exports()
    for name in results:
        results[name]["file"] = EXPORT_FORMATS.get(name).file_name
    fake = {"tflite_fp32": {1: [0.1]}, "tflite_fp16": {1: [0.1]}, "tflite_dynamic": {1: [0.3]}}
    spec = ServingSpec((8, 8, 1), ("a", "b"), False, None, "uint8", 255.0)
    with mock.patch.object(exporter, "measure", return_value=fake):
        exporter._store_benchmark(tmp_path, results, spec)
    assert results["tflite_dynamic"]["note"].startswith("slower than tflite_fp32") and "note" not in results["tflite_fp16"]
    assert "slower than tflite_fp32" in (tmp_path / exporter.BENCHMARK_MARKDOWN).read_text()


def _examples(rare_name: str) -> list[SegmentationExample]:
    """20 images of classes 0 and 1; one more, named `rare_name`, also has class 2."""
    def example(name: str, classes: list[int]) -> SegmentationExample:
        mask = np.zeros((4, 4), np.uint8)
        mask.flat[: len(classes)] = classes
        return SegmentationExample(name, np.zeros((4, 4, 3), np.uint8), mask)

    return [example(f"common{index}.png", [0, 1]) for index in range(20)] + [example(rare_name, [0, 1, 2])]


def test_calibration_includes_a_rare_class() -> None:
    names = [f"rare{index}.png" for index in range(200)]
    rare = max(names, key=lambda name: hashlib.sha256(name.encode()).hexdigest())  # never among the smallest hashes
    examples = _examples(rare)
    with mock.patch.object(exporter, "iter_split", side_effect=lambda *_: iter(examples)):
        chosen, record = exporter.calibration_examples("unused", 4, class_names=("background", "cell", "mitosis"))
        plain = sorted((example.filename for example in examples), key=lambda name: hashlib.sha256(name.encode()).hexdigest())[:4]
        assert rare not in plain  # by hash alone the rare class would be left out
        assert rare in [example.filename for example in chosen] and len(chosen) == 4
        assert record["classes_missing"] == [] and record["train_images_per_class"] == {"background": 21, "cell": 21, "mitosis": 1}
        assert record["examples"] == 4
        again, _ = exporter.calibration_examples("unused", 4)
        assert [example.filename for example in again] == [example.filename for example in chosen]  # deterministic


def test_calibration_set_is_recorded_with_the_export(built: tuple[dict, Path], trained: dict) -> None:
    results, _ = built
    spec = ServingSpec.load(Path(trained["model"]) / SERVING_SUBDIR)
    calibration = results["tflite_int8"]["calibration"]
    assert calibration["examples"] == results["tflite_int8"]["calibration_examples"] == 8
    assert calibration["classes_missing"] == [] and set(calibration["train_images_per_class"]) <= set(spec.class_names)
