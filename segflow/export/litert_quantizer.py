"""The LiteRT quantizer (ai-edge-quantizer), the alternative to the TFLite converter's own
quantization for tflite_dynamic and tflite_int8 (config `export.quantizer`).

It quantizes the float32 TFLite model the converter made (the batch-1 `fixed_size` graph),
with its dynamic_wi8_afp32 recipe (int8 weights, float activations quantized at run time)
or its static_wi8_ai8 recipe (full integer, calibrated on the exporter's class-stratified
images), and compares the two models tensor by tensor (its `validate`): that per-layer
report is stored beside the export.

ai-edge-quantizer 0.10.0's full-integer model has int8 input and output tensors (the input
with the calibrated range, e.g. scale 0.97, zero point -128), where segflow's tflite_int8
contract, and MediaPipe, want uint8 in and out with the input taking raw 8-bit pixels. The
converter makes that interface with a QUANTIZE op at either end (uint8 -> int8 in,
int8 -> uint8 out); `uint8_interface` adds the same two ops here, after which
segflow.export.tflite_metadata.raw_pixel_input sets the input to scale 1, zero point 0 as it does
for the converter's model."""
from __future__ import annotations

import math
import os
from importlib.metadata import version
from typing import Any

import numpy as np

from segflow.export.tflite_metadata import _pack

RECIPES = {"dynamic-range int8": "dynamic_wi8_afp32", "int8": "static_wi8_ai8"}  # export quantization -> ai-edge-quantizer recipe
REPORT_SUFFIX = ".quantizer_report.json"
VALIDATION_SAMPLES = 4  # images the per-layer comparison runs on (it keeps every tensor of both models)


def _threads() -> int:
    return len(os.sched_getaffinity(0))


def _finite(value: float) -> float | None:
    """JSON has no infinity: a tensor the quantizer left exact has an infinite SNR."""
    return float(value) if math.isfinite(value) else None


def _tensors(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    return {name: {metric: _finite(value) for metric, value in metrics.items()} for name, metrics in results.items()}


def quantize(float_model: bytes, quantization: str, samples: list[np.ndarray], described: str) -> tuple[bytes, dict[str, Any]]:
    """`float_model` quantized with the recipe of `quantization` (RECIPES), calibrated on
    `samples` when the recipe needs it, and the per-layer report: MSE and SNR of every tensor
    against the float model's on the first of `samples` (`described` says what they are).
    A full-integer result gets the uint8 interface (see the module docstring)."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe
    from ai_edge_quantizer.utils.validation_utils import ValidationErrorMetric

    name = RECIPES[quantization]
    ((signature, names),) = Interpreter(model_content=float_model).get_signature_list().items()
    (pixels,) = names["inputs"]
    engine = quantizer.Quantizer(float_model, getattr(recipe, name)())
    feed = [{pixels: sample} for sample in samples]
    calibration = engine.calibrate({signature: feed}, num_threads=_threads()) if engine.need_calibration else None
    quantized = bytes(engine.quantize(calibration, enable_progress_report=False).quantized_model)
    compared = engine.validate(
        {signature: feed[:VALIDATION_SAMPLES]}, error_metrics=[ValidationErrorMetric.MSE, ValidationErrorMetric.SNR], num_threads=_threads()
    ).get_signature_comparison_result(signature)
    report = {
        "quantizer": f"ai-edge-quantizer {version('ai-edge-quantizer')}",
        "recipe": name,
        "validation": (
            f"ai-edge-quantizer's validate: each tensor of the quantized model against the float32 TFLite model's, "
            f"on {len(feed[:VALIDATION_SAMPLES])} {described}"
        ),
        "metrics": {"mse": "mean squared error", "snr": "signal-to-noise ratio, signal power over error power (null: no error)"},
        "output": _tensors(compared.output_tensors),
        "layers": _tensors(compared.intermediate_tensors),
        "weights": _tensors(compared.constant_tensors),
    }
    tflite = inline_buffers(quantized)
    if name == RECIPES["int8"]:
        uint8_interface(tflite)
    return _pack(tflite), report


def inline_buffers(model: bytes) -> Any:
    """The model as a schema ModelT with every buffer's data inside the flatbuffer.

    ai-edge-quantizer appends the weights after the flatbuffer (buffers with an offset and
    a size), which a ModelT unpacked and packed again (the MediaPipe metadata, the uint8
    interface) would lose."""
    from tensorflow.lite.python import schema_py_generated as schema

    tflite = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    for buffer in tflite.buffers:
        if buffer.offset > 1:  # 1 marks an empty buffer
            buffer.data = np.frombuffer(model, np.uint8, buffer.size, buffer.offset)
        buffer.offset = buffer.size = 0
    return tflite


def uint8_interface(tflite: Any) -> None:
    """Give a model (a ModelT) with int8 input and output tensors uint8 ones (same scale,
    zero point + 128) and a QUANTIZE op at either end, the interface the converter gives with
    inference_input_type = inference_output_type = uint8."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.python.schema_util import get_builtin_code_from_operator_code

    (graph,) = tflite.subgraphs
    codes = [get_builtin_code_from_operator_code(code) for code in tflite.operatorCodes]
    if schema.BuiltinOperator.QUANTIZE not in codes:
        code = schema.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = schema.BuiltinOperator.QUANTIZE, schema.BuiltinOperator.QUANTIZE, 2
        tflite.operatorCodes.append(code)
        codes.append(schema.BuiltinOperator.QUANTIZE)
    opcode = codes.index(schema.BuiltinOperator.QUANTIZE)

    def uint8_twin(index: int) -> int:
        """A uint8 tensor holding the same real values as int8 tensor `index`."""
        tensor = graph.tensors[index]
        if tensor.type != schema.TensorType.INT8:
            raise ValueError(f"tensor {tensor.name!r} is not int8 (type {tensor.type}); no uint8 interface to add")
        twin = schema.TensorT()
        twin.name = (tensor.name.decode() if isinstance(tensor.name, bytes) else tensor.name) + "_uint8"
        twin.shape, twin.shapeSignature, twin.type, twin.buffer = tensor.shape, tensor.shapeSignature, schema.TensorType.UINT8, 0
        twin.quantization = schema.QuantizationParametersT()
        twin.quantization.scale = np.asarray(tensor.quantization.scale, np.float32)
        twin.quantization.zeroPoint = np.asarray(tensor.quantization.zeroPoint, np.int64) + 128
        graph.tensors.append(twin)
        return len(graph.tensors) - 1

    def quantize_op(source: int, sink: int) -> Any:
        operator = schema.OperatorT()
        operator.opcodeIndex, operator.inputs, operator.outputs = opcode, np.array([source], np.int32), np.array([sink], np.int32)
        return operator

    (old_input,), (old_output,) = graph.inputs, graph.outputs
    new_input, new_output = uint8_twin(old_input), uint8_twin(old_output)
    graph.operators = [quantize_op(new_input, old_input), *graph.operators, quantize_op(old_output, new_output)]
    graph.inputs, graph.outputs = np.array([new_input], np.int32), np.array([new_output], np.int32)
    for signature in tflite.signatureDefs or []:
        for entry in signature.inputs:
            entry.tensorIndex = new_input if entry.tensorIndex == old_input else entry.tensorIndex
        for entry in signature.outputs:
            entry.tensorIndex = new_output if entry.tensorIndex == old_output else entry.tensorIndex
