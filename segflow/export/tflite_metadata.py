"""TFLite model metadata for MediaPipe Tasks' ImageSegmenter (Android, iOS, web, Python):
input normalisation, class labels and output activation, in the TFLite metadata flatbuffer
(schema `metadata_schema.fbs`, file identifier M001, the one tflite-support and MediaPipe
read) and the labels file packed as an uncompressed zip after the model, as MediaPipe's
metadata writer for image segmenters lays them out.

Written here with the `flatbuffers` package rather than with MediaPipe's writer: MediaPipe
needs absl-py 2 (the training stack pins 1.x), and its writer does not even import in the
current wheels (mediapipe 0.10.3x and 1.x import a `mediapipe.tasks.cc` extension that the
wheels no longer ship). tests/export/mediapipe_segment.py runs MediaPipe itself on the result.

The model takes raw pixel counts (scaling and the TFT normalisation are inside it), and
MediaPipe feeds 8-bit pixels p as (p - mean) / std to a float input and as p to a uint8
one: mean 0 and std 1 for 8-bit models, std 255 / value_max for 16-bit ones (an 8-bit pixel
stands for p / 255 of the range). A uint8 input therefore has to hold raw pixels
(quantization scale 1, zero point 0) for MediaPipe to run the model as it is: see
raw_pixel_input. MediaPipe's ImageSegmenter takes 3-channel inputs only, so a 1-channel
model's TFLite export takes colour and turns it grey inside (segflow.export.exporters)."""
from __future__ import annotations

import io
import zipfile
from enum import IntEnum
from typing import Any, Callable

import flatbuffers
import numpy as np

from segflow.export.serving import ServingSpec

METADATA_NAME = "TFLITE_METADATA"  # the model's metadata entry that tflite-support and MediaPipe look for
METADATA_IDENTIFIER = b"M001"
SEGMENTER_OPTIONS_NAME = "SEGMENTER_METADATA"  # MediaPipe's custom metadata: ImageSegmenterOptions
SEGMENTER_OPTIONS_IDENTIFIER = b"V001"
LABELS_FILE = "labels.txt"
MIN_PARSER_VERSION = "1.5.0"  # custom_metadata in SubGraphMetadata came with schema 1.5.0
TFLITE_IDENTIFIER = b"TFL3"

Field = Callable[[flatbuffers.Builder], None]


class _ColorSpace(IntEnum):
    RGB = 1
    GRAYSCALE = 2  # the output's colour space: one value per pixel and class


class _ContentProperties(IntEnum):  # union ContentProperties
    IMAGE_PROPERTIES = 2


class _ProcessUnitOptions(IntEnum):  # union ProcessUnitOptions
    NORMALIZATION_OPTIONS = 1


TENSOR_AXIS_LABELS = 2  # AssociatedFileType
ACTIVATION_NONE = 0  # mediapipe.tasks.Activation: the model outputs probabilities already


def input_normalisation(spec: ServingSpec) -> tuple[float, float]:
    """(mean, std) that turn an 8-bit pixel into the model's raw count (see the module docstring)."""
    return 0.0, (1.0 if spec.input_dtype == "uint8" else 255.0 / spec.value_max)


def mediapipe_unsupported(source: dict[str, Any]) -> str | None:
    """Why MediaPipe cannot feed this model's input (`source`: dtype, shape, scale, zero_point,
    as segflow.export.exporters.tflite_tensors describes it) as it is, or None when it can."""
    if source["shape"][-1] != 3:
        return f"MediaPipe's ImageSegmenter takes 3-channel image inputs; this one has {source['shape'][-1]}"
    if source["dtype"] == "uint8" and (source["scale"], source["zero_point"]) != (1.0, 0):
        return (
            f"MediaPipe feeds raw 8-bit pixels to a uint8 input, but this input's quantization is scale {source['scale']:g}, "
            f"zero point {source['zero_point']} (a 16-bit model, or a uint8 input read by more than a QUANTIZE op)"
        )
    if source["dtype"] not in ("uint8", "float32"):
        return f"MediaPipe feeds uint8 or float32 image tensors, not {source['dtype']}"
    return None


def _strings(builder: flatbuffers.Builder, values: dict[str, str]) -> dict[str, int]:
    return {key: builder.CreateString(value) for key, value in values.items()}


def _offsets(builder: flatbuffers.Builder, offsets: list[int]) -> int:
    builder.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return builder.EndVector()


def _floats(builder: flatbuffers.Builder, values: list[float]) -> int:
    return builder.CreateNumpyVector(np.asarray(values, np.float32))


def _table(builder: flatbuffers.Builder, slots: int, fields: list[Field]) -> int:
    """One table: `slots` is its field count in the schema (a union counts twice: type, value)."""
    builder.StartObject(slots)
    for field in fields:
        field(builder)
    return builder.EndObject()


def _offset(slot: int, value: int) -> Field:
    return lambda builder: builder.PrependUOffsetTRelativeSlot(slot, value, 0)


def _byte(slot: int, value: int) -> Field:
    return lambda builder: builder.PrependInt8Slot(slot, value, 0)


def _int(slot: int, value: int) -> Field:
    return lambda builder: builder.PrependInt32Slot(slot, value, 0)


def _image_content(builder: flatbuffers.Builder, colour: _ColorSpace, value_range: tuple[int, int] | None) -> int:
    """Content { content_properties: ImageProperties { color_space }, range }."""
    properties = _table(builder, 2, [_byte(0, colour)])
    fields = [_byte(0, _ContentProperties.IMAGE_PROPERTIES), _offset(1, properties)]
    if value_range is not None:  # which dimensions of the tensor are the image's (height, width)
        fields.append(_offset(2, _table(builder, 2, [_int(0, value_range[0]), _int(1, value_range[1])])))
    return _table(builder, 3, fields)


def _input_metadata(builder: flatbuffers.Builder, spec: ServingSpec) -> int:
    """TensorMetadata of the image input: colour space, NormalizationOptions and its range."""
    mean, std = input_normalisation(spec)
    grey = " (grey inside the model)" if spec.shape[2] == 1 else ""
    text = _strings(builder, {
        "name": "image",
        "description": f"RGB image {spec.shape[1]}x{spec.shape[0]}{grey}, pixel counts (mean {mean:g}, std {std:g} from 8-bit pixels).",
    })
    content = _image_content(builder, _ColorSpace.RGB, None)
    normalisation = _table(builder, 2, [_offset(0, _floats(builder, [mean])), _offset(1, _floats(builder, [std]))])
    unit = _table(builder, 2, [_byte(0, _ProcessUnitOptions.NORMALIZATION_OPTIONS), _offset(1, normalisation)])
    units = _offsets(builder, [unit])
    stats = _table(builder, 2, [_offset(0, _floats(builder, [(255.0 - mean) / std])), _offset(1, _floats(builder, [(0.0 - mean) / std]))])
    return _table(builder, 7, [_offset(0, text["name"]), _offset(1, text["description"]), _offset(3, content), _offset(4, units), _offset(5, stats)])


def _output_metadata(builder: flatbuffers.Builder, spec: ServingSpec) -> int:
    """TensorMetadata of the per-class probabilities [1,h,w,K] with the labels file for K."""
    text = _strings(builder, {
        "name": "segmentation_masks",
        "description": f"Per-class probabilities at the model size ({len(spec.class_names)} classes); the category mask is their argmax.",
        "file": LABELS_FILE,
        "file_description": "Class names, one per line, in the order of the output's last axis.",
    })
    content = _image_content(builder, _ColorSpace.GRAYSCALE, (1, 2))
    labels = _table(builder, 5, [_offset(0, text["file"]), _offset(1, text["file_description"]), _byte(2, TENSOR_AXIS_LABELS)])
    return _table(builder, 7, [_offset(0, text["name"]), _offset(1, text["description"]), _offset(3, content), _offset(6, _offsets(builder, [labels]))])


def _segmenter_options() -> bytes:
    """mediapipe.tasks.ImageSegmenterOptions { activation: NONE } (its own flatbuffer, V001)."""
    builder = flatbuffers.Builder(0)
    builder.Finish(_table(builder, 2, [_byte(0, ACTIVATION_NONE)]), SEGMENTER_OPTIONS_IDENTIFIER)
    return bytes(builder.Output())


def segmenter_metadata(spec: ServingSpec) -> bytes:
    """The ModelMetadata flatbuffer (M001) of a segflow TFLite export."""
    builder = flatbuffers.Builder(0)
    options = _segmenter_options()
    builder.StartVector(1, len(options), 16)  # CustomMetadata.data is force_align: 16
    builder.head -= len(options)
    builder.Bytes[builder.head : builder.head + len(options)] = options
    options_data = builder.EndVector()
    custom = _table(builder, 2, [_offset(0, builder.CreateString(SEGMENTER_OPTIONS_NAME)), _offset(1, options_data)])
    inputs, outputs = _offsets(builder, [_input_metadata(builder, spec)]), _offsets(builder, [_output_metadata(builder, spec)])
    subgraph = _table(builder, 10, [_offset(2, inputs), _offset(3, outputs), _offset(9, _offsets(builder, [custom]))])
    text = _strings(builder, {
        "name": "segflow image segmenter",
        "description": f"Semantic segmentation into {len(spec.class_names)} classes: {', '.join(spec.class_names)}.",
        "author": "segflow",
        "min_parser_version": MIN_PARSER_VERSION,
    })
    root = _table(builder, 8, [
        _offset(0, text["name"]), _offset(1, text["description"]), _offset(3, _offsets(builder, [subgraph])),
        _offset(4, text["author"]), _offset(7, text["min_parser_version"]),
    ])
    builder.Finish(root, METADATA_IDENTIFIER)
    return bytes(builder.Output())


def _pack(tflite: Any) -> bytes:
    """A TFLite model object (schema_py_generated.ModelT) as a flatbuffer."""
    builder = flatbuffers.Builder(1024)
    builder.Finish(tflite.Pack(builder), TFLITE_IDENTIFIER)
    return bytes(builder.Output())


def raw_pixel_input(model: bytes) -> bytes:
    """A full-integer model whose uint8 input takes raw 8-bit pixels (scale 1, zero point 0),
    as MediaPipe feeds it, whatever range the calibration images spanned.

    The converter gives the uint8 input the calibrated range of the images (scale 0.58 for
    images within 0..147) and requantizes it to the int8 graph with a QUANTIZE op. Setting the
    input's parameters to (1, 0) keeps that op's output, and so the whole graph, as it was: the
    op requantizes from raw pixels instead. Left unchanged when anything but QUANTIZE reads the
    input (then the parameters are the graph's own)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.python.schema_util import get_builtin_code_from_operator_code

    tflite = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    (graph,) = tflite.subgraphs
    (index,) = graph.inputs
    tensor = graph.tensors[index]
    readers = [operator for operator in graph.operators if index in list(operator.inputs)]
    codes = {get_builtin_code_from_operator_code(tflite.operatorCodes[operator.opcodeIndex]) for operator in readers}
    if tensor.type != schema.TensorType.UINT8 or codes != {schema.BuiltinOperator.QUANTIZE}:
        return model
    tensor.quantization.scale = np.array([1.0], np.float32)
    tensor.quantization.zeroPoint = np.array([0], np.int64)
    return _pack(tflite)


def with_segmenter_metadata(model: bytes, spec: ServingSpec) -> bytes:
    """`model` (a TFLite flatbuffer) with the segmenter metadata as its TFLITE_METADATA buffer
    (replacing one already there) and the labels file in a zip appended after it."""
    from tensorflow.lite.python import schema_py_generated as schema

    tflite = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(segmenter_metadata(spec), np.uint8)
    tflite.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(tflite.buffers) - 1
    kept = [item for item in (tflite.metadata or []) if item.name not in (METADATA_NAME, METADATA_NAME.encode())]
    tflite.metadata = [*kept, entry]
    packed = io.BytesIO(_pack(tflite))
    packed.seek(0, io.SEEK_END)
    with zipfile.ZipFile(packed, "a", zipfile.ZIP_STORED) as archive:  # MediaPipe reads stored (uncompressed) members only
        archive.writestr(LABELS_FILE, "".join(f"{name}\n" for name in spec.class_names))
    return packed.getvalue()


def read_labels(model: bytes) -> list[str]:
    """The class names packed with a TFLite export (empty when it has no labels file)."""
    try:
        with zipfile.ZipFile(io.BytesIO(model)) as archive:
            return archive.read(LABELS_FILE).decode().splitlines()
    except (zipfile.BadZipFile, KeyError):
        return []
