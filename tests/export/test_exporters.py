"""Exporter: every row of the capability table as a round trip (export the session's tiny
trained model, load it with its own runtime, run it, evaluate it on the eval split), rows
whose runtime is absent skipped with their reason, the ONNX and quantized rows' specifics,
a saved_model of weights and signatures only, the parity gate, and the Pusher's share of it."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from segflow.components.exporter import core as exporter
from segflow.components.pusher import core as pusher
from segflow.config.experiment import ExperimentConfig, validate_config
from segflow.utils.errors import ConfigError
from segflow.evaluate.evaluation import evaluate
from segflow.data.examples import iter_split
from segflow.export.exporters import ONNX_NORMALISATION_PROPERTY, ONNX_SPEC_PROPERTY, ExportError, ExportFormat, capability_table, normalisation, parity_gate
from segflow.utils.io import read_json, write_json
from segflow.utils.registry import EXPORT_FORMATS
from segflow.export.serving import SERVING_SUBDIR, SPEC_FILE, ServingSpec, serving_mask_predictor
from tests.conftest import pusher_inputs, tiny_raw_config
from segflow.export.exporters import EXPORTS_FILE

ONNX_OPSET = 15  # not the default, so the test sees the setting reach the file


def _with_export(config: ExperimentConfig, **settings: Any) -> ExperimentConfig:
    return config.model_copy(update={"export": config.export.model_copy(update=settings)})


@pytest.fixture(scope="module")
def all_exports(trained: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    config = _with_export(trained["config"], formats=EXPORT_FORMATS.names(), onnx_opset=ONNX_OPSET, calibration_examples=8)
    out = tmp_path_factory.mktemp("exports") / "exports"
    return exporter.run(config, trained["examples"], trained["model"], out), out


@pytest.fixture(scope="module")
def served_mean_iou(trained: dict) -> float:
    serving = Path(trained["model"]) / SERVING_SUBDIR
    return evaluate(serving_mask_predictor(serving), trained["examples"], "eval", ServingSpec.load(serving))["mean_iou"]


def test_capability_table_lists_every_format() -> None:
    table = capability_table()
    assert [row["format"] for row in table] == EXPORT_FORMATS.names()
    assert {"saved_model", "tflite_int16x8", "onnx", "tensorrt_fp16", "tensorrt_int8"} <= {row["format"] for row in table}


@pytest.mark.parametrize("name", EXPORT_FORMATS.names())
def test_every_export_format_round_trips(name: str, all_exports: tuple[dict, Path], trained: dict, served_mean_iou: float) -> None:
    results, out = all_exports
    entry = results[name]
    export: ExportFormat = EXPORT_FORMATS.get(name)
    reason = export.unavailable()
    if reason is not None:  # no runtime or hardware here: recorded, never silent
        assert entry == {"status": "skipped", "reason": reason, "quantization": export.quantization, "runtime": export.runtime}
        assert not (out / export.file_name).exists()
        print(f"{name}: skipped: {reason}")
        return
    assert Path(entry["path"]) == out / export.file_name and entry["file"] == export.file_name
    _check_sidecar(read_json(out / entry["sidecar"]), export, trained)
    assert entry["bytes"] > 0 and entry["bytes"] == exporter._size(out / export.file_name)
    spec = ServingSpec.load(Path(trained["model"]) / SERVING_SUBDIR)
    predict = export.load(out / export.file_name, spec)
    mask = predict(np.random.default_rng(0).integers(0, 255, (37, 29, 3)).astype(np.uint8))
    assert mask.shape == (37, 29) and mask.max() < len(spec.class_names)
    assert entry["reference_mean_iou"] == pytest.approx(served_mean_iou)
    assert entry["status"] == parity_gate(entry["mean_iou"], served_mean_iou, 0.02)["status"]
    if export.needs_representative_data:
        assert entry["calibration_examples"] == 8
    if export.quantization in ("float32", "float16"):
        assert abs(entry["mean_iou"] - served_mean_iou) <= 0.0005 and entry["agreement_with_serving"] > 0.99
        assert entry["status"] == "passed"
    else:
        assert abs(entry["mean_iou"] - served_mean_iou) <= 0.1 and 0.5 < entry["agreement_with_serving"] <= 1.0


def _check_sidecar(sidecar: dict, export: ExportFormat, trained: dict) -> None:
    """Classes, input size, normalisation, quantization and source run, beside every export."""
    spec = ServingSpec.load(Path(trained["model"]) / SERVING_SUBDIR)
    assert (sidecar["format"], sidecar["file"]) == (export.name, export.file_name)
    assert sidecar["classes"] == list(spec.class_names) and sidecar["serving_spec"] == read_json(Path(trained["model"]) / SERVING_SUBDIR / SPEC_FILE)
    assert sidecar["input_size"] == dict(zip(("height", "width", "channels"), spec.shape))
    assert sidecar["normalisation"]["from_8_bit"] == {"mean": 0.0, "std": 1.0} and sidecar["normalisation"]["value_max"] == spec.value_max
    assert sidecar["quantization"]["scheme"] == export.quantization
    assert ("calibration" in sidecar["quantization"]) == export.needs_representative_data
    assert sidecar["source"] == {"name": trained["config"].name, "model": str(trained["model"]), "examples": str(trained["examples"])}
    if export.file_name.endswith(".tflite"):
        assert sidecar["mediapipe"] == {"metadata": True}
        assert sidecar["quantization"]["input"]["shape"] == [1, *spec.shape]
        assert sidecar["quantization"]["output"]["shape"] == [1, *spec.shape[:2], len(spec.class_names)]


def test_exports_json_is_what_run_returned(all_exports: tuple[dict, Path]) -> None:
    results, out = all_exports
    assert exporter.read_exports(out) == json.loads(json.dumps(results))
    assert list(results) == EXPORT_FORMATS.names()


def test_onnx_export_is_checked_opset_set_and_carries_the_spec(all_exports: tuple[dict, Path], trained: dict) -> None:
    import onnx

    results, out = all_exports
    model = onnx.load(str(out / EXPORT_FORMATS.get("onnx").file_name))
    onnx.checker.check_model(model, full_check=True)
    assert {opset.version for opset in model.opset_import if opset.domain in ("", "ai.onnx")} == {ONNX_OPSET}
    properties = {prop.key: prop.value for prop in model.metadata_props}
    assert json.loads(properties[ONNX_SPEC_PROPERTY]) == read_json(Path(trained["model"]) / SERVING_SUBDIR / SPEC_FILE)
    assert json.loads(properties[ONNX_NORMALISATION_PROPERTY]) == normalisation(ServingSpec.load(Path(trained["model"]) / SERVING_SUBDIR))
    assert [node.name for node in model.graph.input] == ["pixels"] and [node.name for node in model.graph.output] == ["probabilities"]
    assert results["onnx"]["agreement_with_serving"] > 0.999


def test_integer_tflite_exports_have_integer_tensors(all_exports: tuple[dict, Path]) -> None:
    from ai_edge_litert.interpreter import Interpreter

    _, out = all_exports
    int8 = Interpreter(model_path=str(out / EXPORT_FORMATS.get("tflite_int8").file_name))
    assert int8.get_input_details()[0]["dtype"] == np.uint8 and int8.get_output_details()[0]["dtype"] == np.uint8
    int16x8 = Interpreter(model_path=str(out / EXPORT_FORMATS.get("tflite_int16x8").file_name))
    assert int16x8.get_input_details()[0]["dtype"] == np.float32  # float in/out, quantized inside
    assert np.int16 in {detail["dtype"] for detail in int16x8.get_tensor_details()}


@pytest.mark.parametrize("name", [name for name in EXPORT_FORMATS.names() if EXPORT_FORMATS.get(name).needs_representative_data])
def test_calibrated_formats_refuse_to_build_without_calibration_data(name: str, trained: dict, tmp_path: Path) -> None:
    export: ExportFormat = EXPORT_FORMATS.get(name)
    if export.unavailable() is not None:
        pytest.skip(f"{name}: {export.unavailable()}")
    with pytest.raises(ExportError, match=r"needs representative \(calibration\) data"):
        export.build(Path(trained["model"]) / SERVING_SUBDIR, tmp_path / export.file_name, None)
    assert not (tmp_path / export.file_name).exists()


# --- saved_model: weights and serving signatures only ---


def _checkpoint_names(saved_model: Path) -> list[str]:
    return [name for name, _ in tf.train.list_variables(str(saved_model / "variables" / "variables"))]


def test_trainer_saved_model_has_no_optimizer_state(all_exports: tuple[dict, Path], trained: dict) -> None:
    _, out = all_exports
    for saved_model in (Path(trained["model"]) / SERVING_SUBDIR, out / EXPORT_FORMATS.get("saved_model").file_name):
        names = _checkpoint_names(saved_model)
        assert names and not [name for name in names if "optimizer" in name.lower()], saved_model


def test_saved_model_export_is_weights_plus_signatures(trained: dict, tiny_data: Path, tmp_path: Path) -> None:
    """A 1M-parameter network after an Adam step (its slots exist, 3x the weights' bytes):
    the export stays within 1.2x the float32 weights and every signature still works."""
    import tf_keras as keras

    from segflow.train.network import build_network
    from segflow.components.transform.core import transform_layer
    from segflow.export.serving import SegmentationServer, saved_model_predictor

    config = validate_config(tiny_raw_config(tiny_data, model={"depth": 2, "base_filters": 48}))
    network = build_network(config)
    network.compile(optimizer=keras.optimizers.Adam(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    network.train_on_batch(rng.random((2, 32, 32, 3), np.float32), rng.integers(0, config.num_labels, (2, 32, 32)))
    weights = sum(weight.numpy().nbytes for weight in network.weights)
    slots = sum(int(np.prod(variable.shape)) for variable in network.optimizer.variables())
    assert weights > 4_000_000 and slots > 1.9 * weights / 4  # Adam: two slots per trainable float32 weight
    spec = ServingSpec.load(Path(trained["model"]) / SERVING_SUBDIR)
    server = SegmentationServer(network, transform_layer(trained["transform"]), spec)
    serving = server.save(tmp_path / "model")
    export = EXPORT_FORMATS.get("saved_model")
    export.build(serving, tmp_path / export.file_name, None)
    size = exporter._size(tmp_path / export.file_name)
    print(f"saved_model export: {size} bytes for {weights} bytes of float32 weights ({size / weights:.3f}x)")
    assert size <= 1.2 * weights
    loaded = tf.saved_model.load(str(tmp_path / export.file_name))
    assert set(loaded.signatures) == {"serving_default", "serving_uint8", "serving_uint16", "fixed_size"}
    image = rng.integers(0, 255, (1, 45, 61, 3)).astype(np.uint8)
    masks = [loaded.signatures[key](images=tf.constant(image.astype(dtype)))["mask"].numpy() for key, dtype in (("serving_default", np.uint8), ("serving_uint8", np.uint8), ("serving_uint16", np.uint16))]
    assert masks[0].shape == (1, 45, 61) and (masks[0] == masks[1]).all() and (masks[0] == masks[2]).all()
    pixels = rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(saved_model_predictor(tmp_path / export.file_name)(pixels), server.fixed_size(tf.constant(pixels))["probabilities"].numpy(), atol=1e-5)


# --- the parity gate ---


@pytest.mark.parametrize(
    ("mean_iou", "reference", "max_drop", "status"),
    [(0.70, 0.70, 0.02, "passed"), (0.68, 0.70, 0.02, "passed"), (0.6799, 0.70, 0.02, "failed"), (0.75, 0.70, 0.0, "passed"), (0.69, 0.70, 0.0, "failed")],
)
def test_parity_gate(mean_iou: float, reference: float, max_drop: float, status: str) -> None:
    verdict = parity_gate(mean_iou, reference, max_drop)
    assert verdict["status"] == status and verdict["reference_mean_iou"] == reference
    assert verdict["mean_iou_drop"] == pytest.approx(reference - mean_iou, abs=1e-6)
    if status == "failed":
        assert f"{mean_iou:.4f}" in verdict["reason"] and f"export.max_drop {max_drop}" in verdict["reason"]
    else:
        assert "reason" not in verdict


def _rarest_class(examples: Path, classes: int) -> int:
    counts = np.zeros(classes, np.int64)
    for example in iter_split(examples, "eval"):
        counts += np.bincount(example.mask.reshape(-1), minlength=256)[:classes]
    return int(np.argmin(np.where(counts > 0, counts, counts.max() + 1)))


@pytest.fixture(scope="module")
def gated_exports(trained: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """saved_model (passes), tflite_fp32 loaded as a predictor of one rare class everywhere
    (mean IoU far below the float model's: fails), tensorrt_fp16 (skipped where absent)."""
    config: ExperimentConfig = trained["config"]
    rarest = _rarest_class(trained["examples"], config.num_labels)
    real = EXPORT_FORMATS.get("tflite_fp32")
    broken = dataclasses.replace(real, load=lambda path, spec: (lambda image: np.full(image.shape[:2], rarest, np.uint8)))
    original_get = EXPORT_FORMATS.get
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EXPORT_FORMATS, "get", lambda name: broken if name == "tflite_fp32" else original_get(name))
        out = tmp_path_factory.mktemp("gated") / "exports"
        results = exporter.run(_with_export(config, formats=["saved_model", "tflite_fp32", "tensorrt_fp16"]), trained["examples"], trained["model"], out)
    return results, out


def test_an_export_below_the_float_model_is_marked_failed(gated_exports: tuple[dict, Path]) -> None:
    results, out = gated_exports
    assert results["saved_model"]["status"] == "passed"
    failed = results["tflite_fp32"]
    assert failed["status"] == "failed" and failed["mean_iou_drop"] > 0.02 and "export.max_drop 0.02" in failed["reason"]
    assert (out / failed["file"]).exists()  # kept for inspection; the Pusher leaves it out
    assert exporter.read_exports(out)["tflite_fp32"]["status"] == "failed"


def test_summary_records_failed_and_skipped_exports(gated_exports: tuple[dict, Path], trained: dict, tmp_path: Path) -> None:
    import shutil

    from segflow.pipelines.local import build_summary

    _, out = gated_exports
    shutil.copytree(out, tmp_path / "exporter" / "exports")
    summary = build_summary(tmp_path, trained["config"], "train", 1.0)
    assert summary["exports"]["tflite_fp32"]["status"] == "failed" and "reason" in summary["exports"]["tflite_fp32"]
    assert summary["exports"]["saved_model"]["path"] == str(tmp_path / "exporter" / "exports" / "saved_model")
    trt = summary["exports"]["tensorrt_fp16"]
    reason = EXPORT_FORMATS.get("tensorrt_fp16").unavailable()
    assert trt["status"] == ("skipped" if reason else "passed") and trt.get("reason") == reason


def _registry_config(config: ExperimentConfig, registry: Path) -> ExperimentConfig:
    return config.model_copy(update={"push": config.push.model_copy(update={"registry": str(registry)})})


def test_pusher_pushes_only_exports_that_passed(gated_exports: tuple[dict, Path], trained: dict, tmp_path: Path) -> None:
    results, out = gated_exports
    config = _registry_config(trained["config"], tmp_path / "registry")
    record = pusher.run(config, out, push_dir=tmp_path / "push", **pusher_inputs(tmp_path / "inputs"))
    assert record["pushed"] and record["exports"] == ["saved_model"]
    assert set(record["withheld"]) == {"tflite_fp32", "tensorrt_fp16"} - ({"tensorrt_fp16"} if results["tensorrt_fp16"]["status"] == "passed" else set())
    assert record["withheld"]["tflite_fp32"].startswith("failed: ")
    version = tmp_path / "registry" / "tiny" / "1"
    assert sorted(os.listdir(version)) == ["_COMMITTED", "exports.json", "lineage.json", "network", "saved_model", "saved_model.json", "statistics.json"]
    assert list(read_json(version / "exports.json")) == ["saved_model"]
    assert read_json(version / "_COMMITTED")["source"] == str(out)
    assert read_json(tmp_path / "push" / pusher.PUSH_FILE) == record


def test_pusher_pushes_nothing_when_no_export_passed(trained: dict, tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "model_fp32.tflite").write_bytes(b"x")
    write_json(exports / EXPORTS_FILE, {"tflite_fp32": {"file": "model_fp32.tflite", "status": "failed", "reason": "too far below"}})
    config = _registry_config(trained["config"], tmp_path / "registry")
    record = pusher.run(config, exports, push_dir=tmp_path / "push", **pusher_inputs(tmp_path / "inputs"))
    assert record == {"pushed": False, "reason": "no export passed the parity gate", "withheld": {"tflite_fp32": "failed: too far below"}}
    assert not (tmp_path / "registry").exists()


def test_pusher_versions_never_overwrite(all_exports: tuple[dict, Path], trained: dict, tmp_path: Path) -> None:
    results, out = all_exports
    config = _registry_config(trained["config"], tmp_path / "registry")
    first = pusher.run(config, out, push_dir=tmp_path / "push1", **pusher_inputs(tmp_path / "inputs1"))
    second = pusher.run(config, out, push_dir=tmp_path / "push2", **pusher_inputs(tmp_path / "inputs2", baseline_version=1))
    assert (first["version"], second["version"]) == (1, 2)
    assert sorted(os.listdir(tmp_path / "registry" / "tiny")) == ["1", "2", "_aliases"]
    passed = sorted(name for name, entry in results.items() if entry["status"] == "passed")
    assert sorted(first["exports"]) == passed
    assert sorted(os.listdir(tmp_path / "registry" / "tiny" / "1")) == sorted(["_COMMITTED", "exports.json", "lineage.json", "network", "statistics.json", *(results[name][key] for name in passed for key in ("file", "sidecar"))])
    assert pusher.run(config, out, push_dir=tmp_path / "push3", **pusher_inputs(tmp_path / "inputs3", blessed=False))["pushed"] is False
    assert sorted(os.listdir(tmp_path / "registry" / "tiny")) == ["1", "2", "_aliases"]


# --- the export config ---


def test_export_config_takes_a_list_or_a_mapping(tiny_data: Path) -> None:
    short = validate_config(tiny_raw_config(tiny_data, export=["saved_model", "onnx"]))
    assert short.export.formats == ["saved_model", "onnx"] and (short.export.max_drop, short.export.onnx_opset, short.export.calibration_examples) == (0.02, 17, 64)
    full = validate_config(tiny_raw_config(tiny_data, export={"formats": ["onnx"], "max_drop": 0.05, "onnx_opset": 13, "calibration_examples": 16}))
    assert (full.export.formats, full.export.max_drop, full.export.onnx_opset, full.export.calibration_examples) == (["onnx"], 0.05, 13, 16)
    assert validate_config(tiny_raw_config(tiny_data)).export.formats == ["saved_model", "tflite_int8"]
    assert ExperimentConfig.from_json(full.to_json()) == full


@pytest.mark.parametrize(
    ("export", "message"),
    [
        (["saved_model", "coreml"], "export.formats: Value error, unknown export format 'coreml'"),
        (["onnx", "onnx"], "export.formats: Value error, export formats must be unique"),
        ({"formats": ["onnx"], "max_drop": 1.5}, "export.max_drop: Input should be less than or equal to 1"),
        ({"formats": ["onnx"], "onnx_opset": 19}, "export.onnx_opset: Input should be less than or equal to 18"),
        ({"formats": ["onnx"], "calibration": 8}, "export.calibration: unknown key"),
        ("onnx", "export: Input should be a valid dictionary or instance of ExportConfig"),
    ],
)
def test_export_config_errors_name_the_key(tiny_data: Path, export: Any, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate_config(tiny_raw_config(tiny_data, export=export))
    assert message in str(error.value)


def test_the_run_report_shows_skipped_and_failed_exports(capsys: pytest.CaptureFixture[str]) -> None:
    from segflow.cli import _report

    summary = {
        "components": {"exporter": {"status": "succeeded", "seconds": 3.0}},
        "exports": {
            "tflite_int8": {"status": "passed", "bytes": 2_000_000, "mean_iou": 0.75},
            "tflite_dynamic": {"status": "failed", "reason": "mean IoU 0.70 is 0.05 below the float model", "bytes": 2_000_000, "mean_iou": 0.70},
            "tensorrt_fp16": {"status": "skipped", "reason": "TensorRT is not installed"},
        },
        "status": "succeeded",
    }
    _report(summary, "runs/x")
    out = capsys.readouterr().out
    assert "tflite_int8" in out and "2.00 MB  mean IoU 0.7500\n" in out
    assert "FAILED: mean IoU 0.70 is 0.05 below" in out and "tensorrt_fp16   skipped: TensorRT is not installed" in out


# --- TFLite metadata for MediaPipe Tasks (tests/export/test_mediapipe.py runs MediaPipe itself) ---


def test_tflite_exports_carry_mediapipe_segmenter_metadata(all_exports: tuple[dict, Path], trained: dict) -> None:
    from tensorflow.lite.python import schema_py_generated as schema

    from segflow.export.tflite_metadata import METADATA_IDENTIFIER, METADATA_NAME, read_labels

    _, out = all_exports
    spec = ServingSpec.load(Path(trained["model"]) / SERVING_SUBDIR)
    for name in [name for name in EXPORT_FORMATS.names() if name.startswith("tflite_")]:
        model = (out / EXPORT_FORMATS.get(name).file_name).read_bytes()
        tflite = schema.Model.GetRootAs(model, 0)
        entries = {tflite.Metadata(index).Name().decode(): tflite.Metadata(index).Buffer() for index in range(tflite.MetadataLength())}
        metadata = tflite.Buffers(entries[METADATA_NAME]).DataAsNumpy().tobytes()
        assert metadata[4:8] == METADATA_IDENTIFIER, name
        assert read_labels(model) == list(spec.class_names), name


def test_mediapipe_metadata_needs_a_raw_pixel_input() -> None:
    from segflow.export.tflite_metadata import mediapipe_unsupported

    raw = {"dtype": "uint8", "shape": [1, 32, 32, 3], "scale": 1.0, "zero_point": 0}
    floats = {"dtype": "float32", "shape": [1, 32, 32, 3], "scale": 0.0, "zero_point": 0}
    assert mediapipe_unsupported(raw) is None and mediapipe_unsupported(floats) is None
    assert "scale 0.5, zero point 3" in str(mediapipe_unsupported({**raw, "scale": 0.5, "zero_point": 3}))
    assert "this one has 1" in str(mediapipe_unsupported({**floats, "shape": [1, 32, 32, 1]}))
    assert "not int16" in str(mediapipe_unsupported({**floats, "dtype": "int16"}))


def test_int8_input_takes_raw_pixels_whatever_the_calibration_range(trained: dict, tmp_path: Path) -> None:
    """Calibration images within 20..148: the converter's uint8 input has scale 0.58; the
    export's has scale 1, zero point 0 (what MediaPipe feeds) and computes the same outputs."""
    from ai_edge_litert.interpreter import Interpreter

    from segflow.export.exporters import ExportOptions, _batch_one_converter, tflite_predictor
    from segflow.export.tflite_metadata import raw_pixel_input, read_labels

    serving = Path(trained["model"]) / SERVING_SUBDIR
    spec = ServingSpec.load(serving)
    narrow = [np.random.default_rng(seed).uniform(20, 148, (1, *spec.shape)).astype(np.float32) for seed in range(8)]
    converter = _batch_one_converter(serving)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([sample] for sample in narrow)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.uint8
    calibrated = converter.convert()
    assert Interpreter(model_content=calibrated).get_input_details()[0]["quantization"][0] < 0.6
    (tmp_path / "calibrated.tflite").write_bytes(calibrated)
    (tmp_path / "raw.tflite").write_bytes(raw_pixel_input(calibrated))
    assert Interpreter(model_path=str(tmp_path / "raw.tflite")).get_input_details()[0]["quantization"] == (1.0, 0)
    pixels = np.round(np.random.default_rng(9).uniform(20, 148, (4, *spec.shape))).astype(np.float32)
    np.testing.assert_array_equal(tflite_predictor(tmp_path / "raw.tflite")(pixels), tflite_predictor(tmp_path / "calibrated.tflite")(pixels))
    export = EXPORT_FORMATS.get("tflite_int8")
    export.build(serving, tmp_path / export.file_name, ExportOptions(representative=lambda: ([sample] for sample in narrow)))
    assert Interpreter(model_path=str(tmp_path / export.file_name)).get_input_details()[0]["quantization"] == (1.0, 0)
    assert read_labels((tmp_path / export.file_name).read_bytes()) == list(spec.class_names)
