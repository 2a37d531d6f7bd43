"""Export formats: a capability table (Ultralytics style), each entry able to build its
artifact from the served SavedModel and to load it back for the parity check.

Every format loads back as a mask predictor (raw image in, class ids out) built from
its own runtime and the one preprocessing path (segflow.data.preprocessing), so the same
evaluation code measures each export on the eval split and compares it with
`serving_default`. A format whose runtime or hardware is absent says why through
`unavailable()`, and the exporter records it as skipped instead of failing or hiding it.
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow as tf

from segflow.data.preprocessing import luma
from segflow.export.litert_quantizer import RECIPES, REPORT_SUFFIX, VALIDATION_SAMPLES
from segflow.export.litert_quantizer import quantize as ai_edge_quantize
from segflow.export.serving import (
    QAT_SERVING_SUBDIR,
    FixedSizePredictor,
    MaskPredictor,
    ServingSpec,
    fixed_size_mask_predictor,
    serving_mask_predictor,
)
from segflow.export.tflite_metadata import (
    input_normalisation,
    mediapipe_unsupported,
    raw_pixel_input,
    read_labels,
    with_segmenter_metadata,
)
from segflow.utils.io import write_json
from segflow.utils.registry import EXPORT_FORMATS
from segflow.utils.runtime import log

RepresentativeData = Callable[[], Iterator[list[np.ndarray]]]

DEFAULT_ONNX_OPSET = 17
ONNX_SPEC_PROPERTY = "segflow.serving_spec"  # ONNX metadata property: the serving_spec.json of the model
ONNX_NORMALISATION_PROPERTY = "segflow.normalisation"  # ONNX metadata property: what the input expects (see normalisation)
TENSORRT_MAX_BATCH = 8  # the engines' optimisation profile covers batches 1..this


class ExportError(RuntimeError):
    """An export that cannot be built or loaded; the message names the file and the cause."""


@dataclass(frozen=True)
class ExportOptions:
    """What a builder may need beyond the served model: calibration data (int8, int16x8)
    and the ONNX opset (onnx, and the TensorRT engines built from the ONNX model)."""

    representative: RepresentativeData | None = None
    onnx_opset: int = DEFAULT_ONNX_OPSET
    quantizer: str = "converter"  # export.quantizer: who quantizes tflite_dynamic and tflite_int8 (see quantizer_of)


def _always_available() -> str | None:
    return None


@dataclass(frozen=True)
class ExportFormat:
    """One row of the capability table. `unavailable()` returns why this machine cannot
    build or run the format (no runtime, no GPU), or None when it can."""

    name: str
    file_name: str
    quantization: str
    runtime: str
    needs_representative_data: bool
    build: Callable[[Path, Path, ExportOptions | None], None]
    load: Callable[[Path, ServingSpec], MaskPredictor]
    description: str
    unavailable: Callable[[], str | None] = _always_available


def register(entry: ExportFormat) -> ExportFormat:
    return EXPORT_FORMATS.add(entry.name, entry)


def capability_table() -> list[dict[str, object]]:
    table: list[dict[str, object]] = []
    for name in EXPORT_FORMATS.names():
        entry: ExportFormat = EXPORT_FORMATS.get(name)
        table.append(
            {
                "format": entry.name,
                "file": entry.file_name,
                "quantization": entry.quantization,
                "runtime": entry.runtime,
                "representative_data": entry.needs_representative_data,
                "unavailable": entry.unavailable(),
            }
        )
    return table


def parity_gate(mean_iou: float, reference_mean_iou: float, max_drop: float) -> dict[str, Any]:
    """An export passes when its eval mean IoU is at most `max_drop` below the float served
    model's on the same split (a tolerance of 1e-9 absorbs float rounding of the difference)."""
    drop = reference_mean_iou - mean_iou
    verdict: dict[str, Any] = {"status": "passed", "reference_mean_iou": reference_mean_iou, "mean_iou_drop": round(drop, 6)}
    if drop > max_drop + 1e-9:
        verdict["status"] = "failed"
        verdict["reason"] = (
            f"eval mean IoU {mean_iou:.4f} is {drop:.4f} below the float served model's {reference_mean_iou:.4f}, "
            f"more than export.max_drop {max_drop}"
        )
    return verdict


def normalisation(spec: ServingSpec) -> dict[str, Any]:
    """What every export's image input expects, the same for all formats: raw pixel counts at
    the model size, since the scaling and the Transform's normalisation are inside the model;
    `from_8_bit` is how an 8-bit pixel p becomes that input, (p - mean) / std (MediaPipe's
    NormalizationOptions)."""
    mean, std = input_normalisation(spec)
    return {
        "input": "raw pixel counts, the image file's own values (float32, or the integers of a quantized input)",
        "image_dtype": spec.input_dtype,
        "value_max": spec.value_max,
        "inside_the_model": "pixels / value_max, then the Transform component's normalisation (tensorflow-transform)",
        "from_8_bit": {"mean": mean, "std": std},
    }


def sidecar_name(file_name: str) -> str:
    """The sidecar JSON beside an export: its file or folder name plus .json."""
    return f"{file_name}.json"


def sidecar(
    export: ExportFormat, path: Path, spec: ServingSpec, source: dict[str, Any], calibration: dict[str, Any] | None, quantizer: str = "converter"
) -> dict[str, Any]:
    """What a client needs beside an export to use it without segflow: classes, input size,
    normalisation, quantization (a TFLite file's tensors as built, which quantizer made them
    under export.quantizer `quantizer` and its per-layer report), where it came from, and
    for TFLite whether MediaPipe's metadata is in it (and why not)."""
    height, width, channels = spec.shape
    quantization: dict[str, Any] = {"scheme": export.quantization, **({"calibration": calibration} if calibration is not None else {})}
    record: dict[str, Any] = {
        "format": export.name,
        "file": export.file_name,
        "runtime": export.runtime,
        "classes": list(spec.class_names),
        "ignore_index": spec.ignore_index,
        "output": (
            "serving_default: any image size in; mask [B,H,W] and per-class probabilities at the image's size out"
            if export.name == "saved_model" else "per-class probabilities [1,h,w,classes] at the model size (the mask is their argmax)"
        ),
        "input_size": {"height": height, "width": width, "channels": channels},
        "normalisation": normalisation(spec),
        "quantization": quantization,
        "source": source,
        "serving_spec": asdict(spec),
    }
    if path.suffix == ".tflite":
        model = path.read_bytes()
        quantization.update(tflite_tensors(model))
        quantization["quantizer"] = quantizer_of(export, quantizer)
        if quantization["quantizer"] == "ai_edge_quantizer":
            quantization["report"] = quantizer_report_name(export.file_name)
        record["input_size"]["channels"] = quantization["input"]["shape"][-1]  # a grey model's TFLite input is colour
        reason = mediapipe_unsupported(quantization["input"])
        record["mediapipe"] = {"metadata": bool(read_labels(model)), **({"reason": reason} if reason is not None else {})}
    return record


def _options(options: ExportOptions | None) -> ExportOptions:
    return options if options is not None else ExportOptions()


def _copy_saved_model(serving_dir: Path, target: Path, _: ExportOptions | None) -> None:
    """The served SavedModel holds weights and signatures only (see SegmentationServer)."""
    shutil.copytree(serving_dir, target)


def _batch_one_converter(serving_dir: Path) -> tf.lite.TFLiteConverter:
    """A converter for the `fixed_size` signature traced with batch 1 (what LiteRT runs).

    With the signature's free batch, every Conv2DTranspose computes its output shape at run
    time (SHAPE, STRIDED_SLICE, PACK into TRANSPOSE_CONV). XNNPACK cannot delegate a
    TRANSPOSE_CONV whose output shape is not a constant, and the builtin hybrid
    (dynamic-range) TRANSPOSE_CONV then costs 30-38 ms per layer on one thread whatever its
    size, against 0.5-11 ms with a constant shape: that made tflite_dynamic 2.3x slower than
    fp32 on the ISBI U-Net (see segflow.export.benchmark). A static batch folds the shape ops away."""
    loaded = tf.saved_model.load(str(serving_dir))
    signature = loaded.signatures["fixed_size"]
    (pixels,) = signature.structured_input_signature[1].values()
    height, width, channels = pixels.shape[1:]
    if channels == 1:  # a colour input, grey inside: MediaPipe's ImageSegmenter takes 3-channel models only
        fixed = tf.function(lambda pixels: signature(pixels=luma(pixels)), input_signature=[tf.TensorSpec([1, height, width, 3], tf.float32, name="pixels")])
    else:
        fixed = tf.function(lambda pixels: signature(pixels=pixels), input_signature=[tf.TensorSpec([1, height, width, channels], tf.float32, name="pixels")])
    return tf.lite.TFLiteConverter.from_concrete_functions([fixed.get_concrete_function()], loaded)


def colour_pixels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """Model-size raw counts [B,h,w,c] for an input of `channels`: a grey image repeated into
    the colour input that a 1-channel model's TFLite export has (see _batch_one_converter);
    the graph turns it back into the same grey (BT.601 weights sum to 1)."""
    return np.repeat(pixels, channels, axis=-1) if pixels.shape[-1] < channels else pixels


def tflite_input_value(source: dict[str, Any], pixels: np.ndarray) -> np.ndarray:
    """Raw counts [1,h,w,c] as a TFLite export's input tensor (`source`: the interpreter's
    input details): repeated into a colour input, quantized for a full-integer one."""
    value = colour_pixels(pixels.astype(np.float32), int(source["shape"][-1]))
    if source["dtype"] != np.float32:
        scale, zero_point = source["quantization"]
        info = np.iinfo(source["dtype"])
        value = np.clip(np.round(value / scale + zero_point), info.min, info.max).astype(source["dtype"])
    return value


def quantizer_of(export: ExportFormat, choice: str) -> str | None:
    """Who quantizes a TFLite export under export.quantizer `choice`: ai-edge-quantizer for
    the formats it has a recipe for (litert_quantizer.RECIPES), the TFLite converter for the
    others; None for a format that is not TFLite."""
    if not export.file_name.endswith(".tflite"):
        return None
    return "ai_edge_quantizer" if choice == "ai_edge_quantizer" and export.quantization in RECIPES else "converter"


def quantizer_report_name(file_name: str) -> str:
    """ai-edge-quantizer's per-layer report beside the export it made."""
    return f"{file_name}{REPORT_SUFFIX}"


def _ai_edge_quantized(serving_dir: Path, target: Path, quantization: str, representative: RepresentativeData | None) -> bytes:
    """The converter's float32 model quantized by ai-edge-quantizer, its per-layer report
    written beside `target`. The dynamic recipe needs no calibration; its report compares
    the models on random images in the pixel range instead."""
    if quantization == "int8" and representative is None:
        raise ExportError(f"{target}: {quantization} quantization needs representative (calibration) data")
    if representative is not None:
        samples, described = [colour_pixels(sample, 3) for (sample,) in representative()], "calibration images"
    else:
        spec = ServingSpec.load(serving_dir)
        channels = 3 if spec.shape[2] == 1 else spec.shape[2]  # the TFLite input of a grey model is colour (see _batch_one_converter)
        random = np.random.default_rng(0).uniform(0, spec.value_max, (VALIDATION_SAMPLES, 1, *spec.shape[:2], channels)).astype(np.float32)
        samples, described = list(random), f"random images, uniform raw pixel counts in 0..{spec.value_max}"
    model, report = ai_edge_quantize(_batch_one_converter(serving_dir).convert(), quantization, samples, described)
    write_json(target.parent / quantizer_report_name(target.name), report)
    return model


def _converted(serving_dir: Path, target: Path, quantization: str, representative: RepresentativeData | None) -> bytes:
    """The TFLite converter's model, quantized by the converter itself."""
    converter = _batch_one_converter(serving_dir)
    if quantization != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantization in ("int8", "int16x8"):
        if representative is None:
            raise ExportError(f"{target}: {quantization} quantization needs representative (calibration) data")
        converter.representative_dataset = lambda: ([colour_pixels(sample, 3)] for (sample,) in representative())
    if quantization == "int8":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    if quantization == "int16x8":  # float32 in and out; int16 activations, int8 weights inside
        # LiteRT has no 16x8 kernels for some ops (SPACE_TO_DEPTH and DEPTH_TO_SPACE of
        # model.pixel_shuffle): those stay float rather than failing the export.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()


def _tflite_builder(quantization: str) -> Callable[[Path, Path, ExportOptions | None], None]:
    def build(serving_dir: Path, target: Path, options: ExportOptions | None) -> None:
        settings = _options(options)
        quantize = _ai_edge_quantized if settings.quantizer == "ai_edge_quantizer" and quantization in RECIPES else _converted
        model = quantize(serving_dir, target, quantization, settings.representative)
        spec = ServingSpec.load(serving_dir)
        if quantization == "int8" and spec.input_dtype == "uint8":  # the uint8 input takes the raw 8-bit pixel
            model = raw_pixel_input(model)
        target.write_bytes(with_mediapipe_metadata(model, spec, target))

    return build


def tflite_tensors(model: bytes) -> dict[str, dict[str, Any]]:
    """A TFLite model's image input and probabilities output: dtype, shape, scale and zero
    point (0 and 0 for a float tensor), what a client must know to feed and read it."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    (source,), (sink,) = interpreter.get_input_details(), interpreter.get_output_details()

    def describe(detail: dict[str, Any]) -> dict[str, Any]:
        scale, zero_point = detail["quantization"]
        return {"dtype": np.dtype(detail["dtype"]).name, "shape": [int(size) for size in detail["shape"]], "scale": float(scale), "zero_point": int(zero_point)}

    return {"input": describe(source), "output": describe(sink)}


def with_mediapipe_metadata(model: bytes, spec: ServingSpec, target: Path) -> bytes:
    """The converted model with MediaPipe's image-segmenter metadata, so MediaPipe Tasks runs it
    with no custom code; unchanged (and the reason logged) when MediaPipe cannot feed its input."""
    reason = mediapipe_unsupported(tflite_tensors(model)["input"])
    if reason is not None:
        log(f"exporter: {target.name}: no MediaPipe metadata: {reason}")
        return model
    return with_segmenter_metadata(model, spec)


def _build_int8_qat(serving_dir: Path, target: Path, options: ExportOptions | None) -> None:
    """Full integer from the quantization-aware network the trainer fine-tuned (config `qat`),
    served beside the float model: the converter takes the ranges it learned."""
    qat_dir = serving_dir.parent / QAT_SERVING_SUBDIR
    if not (qat_dir / "saved_model.pb").is_file():
        raise ExportError(f"{target}: no quantization-aware model in {qat_dir}; the trainer fine-tunes one when the config has `qat:`")
    _tflite_builder("int8")(qat_dir, target, replace(_options(options), quantizer="converter"))  # the converter reads the learned ranges


def load_tflite(path: Path, spec: ServingSpec) -> MaskPredictor:
    return fixed_size_mask_predictor(tflite_predictor(path), spec)


def load_saved_model(path: Path, _: ServingSpec) -> MaskPredictor:
    return serving_mask_predictor(path)


def _threads() -> int:
    return len(os.sched_getaffinity(0))


def tflite_predictor(path: Path) -> FixedSizePredictor:
    """A LiteRT interpreter wrapped as a float predictor (quantizes input, dequantizes output;
    a grey model-size image repeated into a 1-channel model's colour input)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=_threads())
    interpreter.allocate_tensors()
    (source,), (sink,) = interpreter.get_input_details(), interpreter.get_output_details()

    def predict(pixels: np.ndarray) -> np.ndarray:
        outputs = []
        for single in pixels:  # the converted graph has batch size 1
            interpreter.set_tensor(source["index"], tflite_input_value(source, single[None]))
            interpreter.invoke()
            result = interpreter.get_tensor(sink["index"])
            scale, zero_point = sink["quantization"]
            if sink["dtype"] != np.float32:
                result = (result.astype(np.float32) - zero_point) * scale
            outputs.append(result[0])
        return np.stack(outputs)

    return predict


def write_onnx(serving_dir: Path, target: Path, opset: int) -> None:
    """tf2onnx from the `fixed_size` signature (the graph the TFLite exports are converted
    from too), the serving spec (class names among it) and the input's normalisation in the
    model's metadata properties, checked with onnx's checker."""
    import onnx
    from tf2onnx import tf_loader
    from tf2onnx.convert import from_graph_def

    graph_def, inputs, outputs, _, renames = tf_loader.from_saved_model(
        str(serving_dir), None, None, tag="serve", signatures=["fixed_size"], return_initialized_tables=True, return_tensors_to_rename=True
    )
    model, _ = from_graph_def(graph_def, name="segflow", input_names=inputs, output_names=outputs, opset=opset, tensors_to_rename=renames)
    spec = ServingSpec.load(serving_dir)
    onnx.helper.set_model_props(model, {ONNX_SPEC_PROPERTY: json.dumps(asdict(spec)), ONNX_NORMALISATION_PROPERTY: json.dumps(normalisation(spec))})
    try:  # tf2onnx leaves an op it cannot convert in the graph; the checker rejects it
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(f"{target}: the ONNX model tf2onnx made from {serving_dir} (opset {opset}) fails onnx's checker: {error}") from None
    target.write_bytes(model.SerializeToString())


def _build_onnx(serving_dir: Path, target: Path, options: ExportOptions | None) -> None:
    write_onnx(serving_dir, target, _options(options).onnx_opset)


def onnx_predictor(path: Path) -> FixedSizePredictor:
    """An onnxruntime CPU session as a float predictor ([B,h,w,c] raw counts -> probabilities)."""
    import onnxruntime

    settings = onnxruntime.SessionOptions()
    settings.intra_op_num_threads = _threads()
    try:
        session = onnxruntime.InferenceSession(str(path), settings, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types, one per cause
        raise ExportError(f"{path}: onnxruntime cannot load it: {error}") from error
    (source,), (sink,) = session.get_inputs(), session.get_outputs()

    def predict(pixels: np.ndarray) -> np.ndarray:
        return session.run([sink.name], {source.name: pixels.astype(np.float32)})[0]

    return predict


def load_onnx(path: Path, spec: ServingSpec) -> MaskPredictor:
    return fixed_size_mask_predictor(onnx_predictor(path), spec)


def _cuda_runtime_library() -> ctypes.CDLL | None:
    """libcudart (already loaded by TensorFlow on a GPU machine, or from the nvidia-cuda-runtime
    wheel): the device buffers TensorRT's Python API leaves to the caller, with no extra package."""
    try:
        return ctypes.CDLL("libcudart.so.12")
    except OSError:
        pass
    found = importlib.util.find_spec("nvidia.cuda_runtime")
    folders = list(found.submodule_search_locations or []) if found is not None else []
    for folder in folders:
        library = Path(folder) / "lib" / "libcudart.so.12"
        if library.exists():
            return ctypes.CDLL(str(library))
    return None


def _tensorrt_unavailable() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT's Python package (tensorrt) is not installed; it is in the GPU image (containers/Dockerfile.gpu)"
    if not tf.config.list_physical_devices("GPU"):
        return "no NVIDIA GPU is visible (TensorRT engines are built for and run on one)"
    if _cuda_runtime_library() is None:
        return "the CUDA runtime library libcudart.so.12 is not found"
    return None


class _DeviceBuffer:
    """One CUDA device allocation and the copies to and from it (cudaMemcpy kinds 1 and 2)."""

    def __init__(self, cuda: ctypes.CDLL, nbytes: int) -> None:
        self._cuda = cuda
        self.pointer = ctypes.c_void_p()
        self._check(cuda.cudaMalloc(ctypes.byref(self.pointer), ctypes.c_size_t(nbytes)), f"cudaMalloc of {nbytes} bytes")

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise ExportError(f"CUDA {what} failed with error code {code}")

    def upload(self, array: np.ndarray) -> None:
        self._check(self._cuda.cudaMemcpy(self.pointer, array.ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(array.nbytes), 1), "copy to the device")

    def download(self, array: np.ndarray) -> None:
        self._check(self._cuda.cudaMemcpy(array.ctypes.data_as(ctypes.c_void_p), self.pointer, ctypes.c_size_t(array.nbytes), 2), "copy from the device")

    def free(self) -> None:
        self._cuda.cudaFree(self.pointer)


def _require_cuda() -> ctypes.CDLL:
    cuda = _cuda_runtime_library()
    if cuda is None:
        raise ExportError("the CUDA runtime library libcudart.so.12 is not found")
    return cuda


def _tensorrt_builder(precision: str) -> Callable[[Path, Path, ExportOptions | None], None]:
    """A serialized TensorRT engine built from the ONNX export with TensorRT's Python API;
    int8 calibrates on the representative data (TensorRT's entropy calibrator) and lets
    layers without an int8 kernel fall back to fp16."""

    def build(serving_dir: Path, target: Path, options: ExportOptions | None) -> None:
        import tensorrt as trt

        settings = _options(options)
        spec = ServingSpec.load(serving_dir)
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        with tempfile.TemporaryDirectory() as scratch:
            onnx_path = Path(scratch) / "model.onnx"
            write_onnx(serving_dir, onnx_path, settings.onnx_opset)
            if not parser.parse_from_file(str(onnx_path)):
                errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
                raise ExportError(f"{target}: TensorRT cannot parse the ONNX model of {serving_dir}: {errors}")
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        one = (1, *spec.shape)
        profile.set_shape(network.get_input(0).name, one, one, (TENSORRT_MAX_BATCH, *spec.shape))
        config.add_optimization_profile(profile)
        config.set_flag(trt.BuilderFlag.FP16)
        buffers: list[_DeviceBuffer] = []
        if precision == "int8":
            if settings.representative is None:
                raise ExportError(f"{target}: TensorRT int8 needs representative (calibration) data")
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = _calibrator(trt, [sample for (sample,) in settings.representative()], buffers)
            config.set_calibration_profile(profile)
        try:
            serialized = builder.build_serialized_network(network, config)
        finally:
            for buffer in buffers:
                buffer.free()
        if serialized is None:
            raise ExportError(f"{target}: TensorRT could not build a {precision} engine from {serving_dir} (its log above says why)")
        target.write_bytes(bytes(serialized))

    return build


def _calibrator(trt: Any, samples: list[np.ndarray], buffers: list[_DeviceBuffer]) -> Any:
    """TensorRT's entropy calibrator fed one [1,h,w,c] sample per batch from a device
    buffer (appended to `buffers`, freed by the caller once the engine is built)."""
    cuda = _require_cuda()

    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.remaining = [np.ascontiguousarray(sample, np.float32) for sample in samples]
            self.buffer = _DeviceBuffer(cuda, self.remaining[0].nbytes)
            buffers.append(self.buffer)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            if not self.remaining:
                return None
            self.buffer.upload(self.remaining.pop(0))
            return [int(self.buffer.pointer.value or 0)]

        def read_calibration_cache(self) -> None:
            return None

        def write_calibration_cache(self, cache: bytes) -> None:
            return None

    return Calibrator()


def tensorrt_predictor(path: Path) -> FixedSizePredictor:
    """A deserialized TensorRT engine as a float predictor, one image per execution."""
    import tensorrt as trt

    cuda = _require_cuda()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise ExportError(f"{path}: TensorRT cannot deserialize the engine (built by another TensorRT version or for another GPU?)")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
    (source,) = [name for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
    (sink,) = [name for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT]

    def predict(pixels: np.ndarray) -> np.ndarray:
        source_type, sink_type = trt.nptype(engine.get_tensor_dtype(source)), trt.nptype(engine.get_tensor_dtype(sink))
        context.set_input_shape(source, (1, *pixels.shape[1:]))
        result = np.empty(tuple(context.get_tensor_shape(sink)), sink_type)
        device: dict[str, _DeviceBuffer] = {}
        outputs = []
        try:
            device[source] = _DeviceBuffer(cuda, int(np.prod(pixels.shape[1:])) * np.dtype(source_type).itemsize)
            device[sink] = _DeviceBuffer(cuda, result.nbytes)
            for single in pixels:  # one image per execution, as LiteRT runs them
                device[source].upload(np.ascontiguousarray(single[None], source_type))
                if not context.execute_v2([int(device[name].pointer.value or 0) for name in names]):
                    raise ExportError(f"{path}: TensorRT execution failed")
                device[sink].download(result)
                outputs.append(result[0].astype(np.float32))
        finally:
            for buffer in device.values():
                buffer.free()
        return np.stack(outputs)

    predict.keepalive = (runtime, engine, context)  # type: ignore[attr-defined]  # the context needs its engine alive
    return predict


def load_tensorrt(path: Path, spec: ServingSpec) -> MaskPredictor:
    return fixed_size_mask_predictor(tensorrt_predictor(path), spec)


register(
    ExportFormat(
        "saved_model", "saved_model", "float32", "TensorFlow / TF Serving", False, _copy_saved_model,
        load_saved_model,
        "TensorFlow SavedModel, weights and signatures only: raw uint8/uint16 images of any size in, mask out (TF Serving, Vertex AI)",
    )
)
for _name, _quantization, _representative, _doc in (
    ("tflite_fp32", "float32", False, "TFLite float32: reference accuracy on LiteRT"),
    ("tflite_fp16", "float16", False, "TFLite float16 weights: half the size, for GPU delegates"),
    ("tflite_dynamic", "dynamic-range int8", False, "TFLite dynamic-range: int8 weights, float activations"),
    ("tflite_int8", "int8", True, "TFLite full-integer int8 (uint8 in/out): Edge TPU, NPUs, microcontrollers"),
    ("tflite_int16x8", "int16x8", True, "TFLite 16-bit activations, 8-bit weights (float32 in/out): closer to float than int8"),
):
    register(ExportFormat(_name, f"model_{_name.removeprefix('tflite_')}.tflite", _quantization, "LiteRT", _representative, _tflite_builder(_quantization), load_tflite, _doc))
register(
    ExportFormat(
        "tflite_int8_qat", "model_int8_qat.tflite", "int8 (quantization-aware training)", "LiteRT", True, _build_int8_qat, load_tflite,
        "TFLite full-integer int8 (uint8 in/out) from a tensorflow-model-optimization QAT fine-tune (config `qat`): int8's speed, closer to float",
    )
)
register(
    ExportFormat(
        "onnx", "model.onnx", "float32", "onnxruntime", False, _build_onnx, load_onnx,
        "ONNX (tf2onnx from the fixed_size signature, opset export.onnx_opset), float32 raw counts in, probabilities out",
    )
)
for _name, _quantization, _precision, _doc in (
    ("tensorrt_fp16", "float16", "fp16", "TensorRT engine, fp16, built from the ONNX model on an NVIDIA GPU"),
    ("tensorrt_int8", "int8", "int8", "TensorRT engine, int8 (entropy calibration) with fp16 fallback, built from the ONNX model on an NVIDIA GPU"),
):
    register(
        ExportFormat(
            _name, f"model_{_precision}.engine", _quantization, "TensorRT", _precision == "int8", _tensorrt_builder(_precision), load_tensorrt, _doc,
            _tensorrt_unavailable,
        )
    )


EXPORTS_FILE = "exports.json"


BENCHMARK_FILE = "benchmark.json"
