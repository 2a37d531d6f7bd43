"""Export formats: a capability table (Ultralytics style), each entry able to build its
artifact from the served SavedModel and to load it back for the parity check.

Every format loads back as a mask predictor (raw image in, class ids out) built from
its own runtime and the one preprocessing path (segflow.preprocessing), so the same
evaluation code measures each export on the eval split and compares it with
`serving_default`.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

from segflow.registry import EXPORT_FORMATS
from segflow.serving import FixedSizePredictor, MaskPredictor, ServingSpec, fixed_size_mask_predictor, serving_mask_predictor

RepresentativeData = Callable[[], Iterator[list[np.ndarray]]]


@dataclass(frozen=True)
class ExportFormat:
    """One row of the capability table."""

    name: str
    file_name: str
    quantization: str
    runtime: str
    needs_representative_data: bool
    build: Callable[[Path, Path, RepresentativeData | None], None]
    load: Callable[[Path, ServingSpec], MaskPredictor]
    description: str


def register(entry: ExportFormat) -> ExportFormat:
    return EXPORT_FORMATS.add(entry.name, entry)


def capability_table() -> list[dict[str, object]]:
    return [
        {
            "format": entry.name,
            "file": entry.file_name,
            "quantization": entry.quantization,
            "runtime": entry.runtime,
            "representative_data": entry.needs_representative_data,
        }
        for entry in (EXPORT_FORMATS.get(name) for name in EXPORT_FORMATS.names())
    ]


def _copy_saved_model(serving_dir: Path, target: Path, _: RepresentativeData | None) -> None:
    shutil.copytree(serving_dir, target)


def _tflite_builder(quantization: str) -> Callable[[Path, Path, RepresentativeData | None], None]:
    def build(serving_dir: Path, target: Path, representative: RepresentativeData | None) -> None:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(serving_dir), signature_keys=["fixed_size"])
        if quantization != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantization == "int8":
            if representative is None:
                raise ValueError("int8 quantization needs representative data")
            converter.representative_dataset = representative
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.uint8
            converter.inference_output_type = tf.uint8
        target.write_bytes(converter.convert())

    return build


def load_tflite(path: Path, spec: ServingSpec) -> MaskPredictor:
    return fixed_size_mask_predictor(tflite_predictor(path), spec.shape)


def load_saved_model(path: Path, _: ServingSpec) -> MaskPredictor:
    return serving_mask_predictor(path)


def tflite_predictor(path: Path) -> FixedSizePredictor:
    """A LiteRT interpreter wrapped as a float predictor (quantizes input, dequantizes output)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=len(os.sched_getaffinity(0)))
    interpreter.allocate_tensors()
    (source,), (sink,) = interpreter.get_input_details(), interpreter.get_output_details()

    def predict(pixels: np.ndarray) -> np.ndarray:
        outputs = []
        for single in pixels:  # the converted graph has batch size 1
            value = single[None].astype(np.float32)
            scale, zero_point = source["quantization"]
            if source["dtype"] != np.float32:
                info = np.iinfo(source["dtype"])
                value = np.clip(np.round(value / scale + zero_point), info.min, info.max).astype(source["dtype"])
            interpreter.set_tensor(source["index"], value)
            interpreter.invoke()
            result = interpreter.get_tensor(sink["index"])
            scale, zero_point = sink["quantization"]
            if sink["dtype"] != np.float32:
                result = (result.astype(np.float32) - zero_point) * scale
            outputs.append(result[0])
        return np.stack(outputs)

    return predict


register(
    ExportFormat(
        "saved_model", "saved_model", "float32", "TensorFlow / TF Serving", False, _copy_saved_model,
        load_saved_model,
        "TensorFlow SavedModel: raw uint8/uint16 images of any size in, mask out (TF Serving, Vertex AI)",
    )
)
for _name, _quantization, _representative, _doc in (
    ("tflite_fp32", "float32", False, "TFLite float32: reference accuracy on LiteRT"),
    ("tflite_fp16", "float16", False, "TFLite float16 weights: half the size, for GPU delegates"),
    ("tflite_dynamic", "dynamic-range int8", False, "TFLite dynamic-range: int8 weights, float activations"),
    ("tflite_int8", "int8", True, "TFLite full-integer int8 (uint8 in/out): Edge TPU, NPUs, microcontrollers"),
):
    register(ExportFormat(_name, f"model_{_name.removeprefix('tflite_')}.tflite", _quantization, "LiteRT", _representative, _tflite_builder(_quantization), load_tflite, _doc))
