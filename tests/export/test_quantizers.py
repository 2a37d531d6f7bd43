"""export.quantizer: the TFLite converter and LiteRT's ai-edge-quantizer each build
tflite_dynamic and tflite_int8 from the session's tiny trained model, with the contract
every TFLite export has (segflow's loader runs it, uint8 in/out with raw-pixel input for
int8, MediaPipe metadata, sidecar); ai-edge-quantizer's per-layer report lies beside its
files, the sidecar names it and the Pusher publishes it with them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from segflow.components.exporter import core as exporter
from segflow.config.experiment import validate_config
from segflow.utils.errors import ConfigError
from segflow.export.exporters import ExportFormat, quantizer_report_name
from segflow.export.litert_quantizer import REPORT_SUFFIX
from segflow.utils.io import read_json
from segflow.utils.registry import EXPORT_FORMATS
from segflow.export.serving import SERVING_SUBDIR, ServingSpec
from segflow.export.tflite_metadata import read_labels
from tests.conftest import pusher_inputs, tiny_raw_config
from tests.export.test_exporters import _check_sidecar

FORMATS = ["tflite_dynamic", "tflite_int8"]
QUANTIZERS = ["converter", "ai_edge_quantizer"]


@pytest.fixture(scope="module", params=QUANTIZERS)
def quantized(request: pytest.FixtureRequest, trained: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, Path]:
    config = trained["config"]
    config = config.model_copy(update={"export": config.export.model_copy(update={"formats": FORMATS, "calibration_examples": 8, "quantizer": request.param})})
    out = tmp_path_factory.mktemp(request.param) / "exports"
    return request.param, exporter.run(config, trained["examples"], trained["model"], out), out


@pytest.mark.parametrize("name", FORMATS)
def test_both_quantizers_keep_the_tflite_contract(name: str, quantized: tuple[str, dict, Path], trained: dict) -> None:
    from ai_edge_litert.interpreter import Interpreter

    quantizer, results, out = quantized
    entry, export = results[name], EXPORT_FORMATS.get(name)
    spec = ServingSpec.load(Path(trained["model"]) / SERVING_SUBDIR)
    assert entry["status"] == "passed" and entry["quantizer"] == quantizer and entry["agreement_with_serving"] > 0.9
    sidecar = read_json(out / entry["sidecar"])
    _check_sidecar(sidecar, export, trained)
    assert sidecar["quantization"]["quantizer"] == quantizer
    mask = export.load(out / export.file_name, spec)(np.random.default_rng(0).integers(0, 255, (37, 29, 3)).astype(np.uint8))
    assert mask.shape == (37, 29) and mask.max() < len(spec.class_names)
    model = (out / export.file_name).read_bytes()
    assert read_labels(model) == list(spec.class_names)
    interpreter = Interpreter(model_content=model)
    (source,), (sink,) = interpreter.get_input_details(), interpreter.get_output_details()
    if name == "tflite_int8":
        assert (source["dtype"], sink["dtype"]) == (np.uint8, np.uint8) and source["quantization"] == (1.0, 0)
    else:
        assert (source["dtype"], sink["dtype"]) == (np.float32, np.float32)


@pytest.mark.parametrize("name", FORMATS)
def test_ai_edge_quantizer_report_names_layers(name: str, quantized: tuple[str, dict, Path]) -> None:
    quantizer, results, out = quantized
    export: ExportFormat = EXPORT_FORMATS.get(name)
    report_path = out / quantizer_report_name(export.file_name)
    if quantizer == "converter":
        assert not report_path.exists() and "quantizer_report" not in results[name]
        return
    assert results[name]["quantizer_report"] == report_path.name
    assert read_json(out / results[name]["sidecar"])["quantization"]["report"] == report_path.name
    report: dict[str, Any] = read_json(report_path)
    assert report["recipe"] == {"tflite_dynamic": "dynamic_wi8_afp32", "tflite_int8": "static_wi8_ai8"}[name]
    convolutions = [layer for layer in report["layers"] if "Conv2D" in layer]
    assert convolutions and all(set(report["layers"][layer]) == {"mse", "snr"} for layer in convolutions)
    ((output, errors),) = report["output"].items()
    assert errors["mse"] is not None and errors["mse"] < 0.05, output


def test_export_quantizer_config(tiny_data: Path) -> None:
    assert validate_config(tiny_raw_config(tiny_data)).export.quantizer == "converter"
    chosen = validate_config(tiny_raw_config(tiny_data, export={"formats": ["tflite_int8"], "quantizer": "ai_edge_quantizer"}))
    assert chosen.export.quantizer == "ai_edge_quantizer"
    with pytest.raises(ConfigError, match="export.quantizer: Input should be 'converter' or 'ai_edge_quantizer'"):
        validate_config(tiny_raw_config(tiny_data, export={"formats": ["tflite_int8"], "quantizer": "aeq"}))


def test_the_pusher_publishes_the_report_with_the_export(quantized: tuple[str, dict, Path], trained: dict, tmp_path: Path) -> None:
    from segflow.components.pusher import core as pusher

    quantizer, results, out = quantized
    config = trained["config"]
    config = config.model_copy(update={"push": config.push.model_copy(update={"registry": str(tmp_path / "registry")})})
    assert pusher.run(config, out, push_dir=tmp_path / "push", **pusher_inputs(tmp_path / "inputs"))["pushed"]
    reports = sorted(entry["quantizer_report"] for entry in results.values() if "quantizer_report" in entry)
    assert len(reports) == (2 if quantizer == "ai_edge_quantizer" else 0)
    version = tmp_path / "registry" / config.name / "1"
    assert sorted(path.name for path in version.glob(f"*{REPORT_SUFFIX}")) == reports
