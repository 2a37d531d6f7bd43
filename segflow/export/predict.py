"""`segflow predict`: segment new images of any size with a served model or an export.

A model sees tiles of its own size: an image is cut into tiles that overlap by a share of
the tile, each tile goes through the model's `fixed_size` path (the SavedModel signature,
or a TFLite/ONNX export converted from it), and the class probabilities are blended with a
raised-cosine window before the argmax. So a large image is never squeezed into one model
input, tile borders (where a convolution sees zero padding) weigh nothing or little, and
there are no seams. An image smaller than the model is padded by reflection, never resized.
A model trained on images resized to its size (512x512 files at 256x256) learnt objects at
that scale, so the image is first resampled by the same factor (`scale`, read from the
run's statistics when known) and the probabilities come back at the image's own size.
Pixels go through `segflow.data.preprocessing` (model_pixels, resize_back) like in training and
serving, so normalisation cannot drift.

Outputs, in a folder:
- `png`: `<stem>.png`, one channel of class ids 0..K-1 (ignore_index is a training label
  and is never predicted).
- `overlay`: `<stem>_overlay.png`, the image with every class but 0 tinted in its colour.
- `rle`: `rle.csv` with columns `filename,class,rle`: one row per image and class 1..K-1
  (class 0 is the rest of the image), in the Kaggle run-length convention: pixels numbered
  from 1, top to bottom then left to right (column-major), `start length` pairs separated
  by spaces, empty when the class is absent.
- `predict.json`: the model used, the options, and `skipped`: every input that could not
  be read, with the reason.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from segflow import console
from segflow.console import progress
from segflow.data.preprocessing import (
    model_pixels,
    resize_back,
    scale_pixels,
    to_model_channels,
)
from segflow.export.serving import (
    SERVING_SUBDIR,
    SPEC_FILE,
    FixedSizePredictor,
    ServingSpec,
    saved_model_predictor,
)
from segflow.model.tta import TTA_VIEWS, from_view, to_view
from segflow.utils.io import (
    IMAGE_SUFFIXES,
    ImageReadError,
    encode_png,
    read_image,
    write_json,
)
from segflow.utils.storage import write_bytes

DEFAULT_OVERLAP = 0.25  # share of the tile that neighbouring tiles share
DEFAULT_BATCH = 4  # tiles per model call
NATIVE_SCALE = (1.0, 1.0)  # resize factor (model pixels per image pixel) per axis: 1 = the file's own resolution
BLEND_DEAD_SHARE = 4  # the outer 1/4 of each overlap weighs 0 (see blend_ramp)
FORMATS = ("png", "overlay", "rle")
RLE_FILE = "rle.csv"
REPORT_FILE = "predict.json"
OVERLAY_ALPHA = 0.5
# Distinct colours for classes 1, 2, ... (Tableau 10); class 0 stays uncoloured in overlays.
PALETTE = np.array(
    [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
     (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)],
    np.float32,
)
# Where a run folder keeps its served model and its exports (segflow/pipelines/local.py lays it out).
RUN_SERVED_MODEL = Path("trainer", "model", SERVING_SUBDIR)
RUN_EXPORTS = Path("exporter", "exports")
RUN_STATISTICS = Path("statistics_gen", "statistics")
SAVED_MODEL_EXPORT = "saved_model"  # the saved_model export's folder inside an exports folder
MODEL_FILES = {".tflite": ("tflite", "TFLite file"), ".onnx": ("onnx", "ONNX file")}  # suffix -> kind, note


class PredictError(ValueError):
    """A model, spec or input path that cannot be used; the message names it."""


@dataclass(frozen=True)
class LoadedModel:
    """A model-size predictor with the spec that says how to feed it."""

    predict_fixed: FixedSizePredictor
    spec: ServingSpec
    kind: str  # saved_model, tflite or onnx
    path: Path
    spec_source: str  # the serving_spec.json used, or the ONNX metadata it came from
    note: str  # why this model and spec were chosen, for the user
    training_scale: tuple[float, float] | None  # model size / train image size, when the run says
    scale_note: str  # where training_scale came from, or why it is unknown


@dataclass(frozen=True)
class PredictOptions:
    """How to predict, checked once before any image is read."""

    overlap: float = DEFAULT_OVERLAP
    tta: bool = False
    threshold: float | None = None  # sigmoid models only; None = 0.5, as serving_default
    min_object: int = 0
    min_hole: int = 0
    batch: int = DEFAULT_BATCH
    scale: tuple[float, float] | None = None  # None: the model's training scale when known, else native

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise PredictError(f"overlap must be in [0, 1) (a share of the tile size), not {self.overlap}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise PredictError(f"threshold must be in (0, 1), not {self.threshold}")
        if self.min_object < 0 or self.min_hole < 0:
            raise PredictError("min_object and min_hole are pixel counts and cannot be negative")
        if self.batch < 1:
            raise PredictError(f"batch must be at least 1, not {self.batch}")
        if self.scale is not None and min(self.scale) <= 0:
            raise PredictError(f"scale must be positive, not {self.scale}")


# --- tiling and blending ---------------------------------------------------------------


def output_classes(spec: ServingSpec) -> int:
    """Probability channels the model gives: a sigmoid head is served as [1-p, p]."""
    return 2 if spec.sigmoid else len(spec.class_names)


def overlap_pixels(overlap: float, tile: int) -> int:
    """A share of the tile in whole pixels; at most tile - 1 so that tiles always advance."""
    return min(int(round(overlap * tile)), tile - 1)


def tile_positions(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size) with at least `overlap`
    shared pixels; the last tile ends exactly at `size` (so never runs past the image).
    A size below the tile gives one tile at 0: the image is padded to the tile first."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, {tile})")
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def blend_ramp(length: int, overlap: int, fade_in: bool, fade_out: bool) -> np.ndarray:
    """1D tile weights: a raised-cosine rise over the first `overlap` pixels (fade_in) and
    fall over the last (fade_out), 1 elsewhere. The outer quarter of the overlap weighs 0:
    there a convolution sees the tile's zero padding (a random U-Net disagrees with its
    whole-image answer on 0.3% of a 1024x1024 image without it, on none with it), and the
    neighbouring tile covers it with weight 1. A side on the image border does not fade,
    since no other tile covers it. Rise and fall are sin^2 and cos^2 of the same angle, so
    two tiles that overlap by exactly `overlap` pixels have weights summing to 1 there."""
    weights = np.ones(length, np.float32)
    if overlap:
        margin = overlap // BLEND_DEAD_SHARE
        position = np.clip((np.arange(overlap) + 0.5 - margin) / (overlap - 2 * margin), 0.0, 1.0)
        rise = (np.sin(0.5 * np.pi * position) ** 2).astype(np.float32)
        if fade_in:
            weights[:overlap] = rise
        if fade_out:
            weights[length - overlap:] = np.minimum(weights[length - overlap:], rise[::-1])
    return weights


def blend_window(start: tuple[int, int], tile: tuple[int, int], size: tuple[int, int], overlap: tuple[int, int]) -> np.ndarray:
    """2D weights [h, w] of the tile at `start` in an image of `size`: the outer product of
    the two axes' ramps, fading only towards sides that another tile also covers."""
    ramps = [
        blend_ramp(tile[axis], overlap[axis], start[axis] > 0, start[axis] + tile[axis] < size[axis])
        for axis in (0, 1)
    ]
    return np.outer(ramps[0], ramps[1])


def pad_to_tile(image: np.ndarray, tile: tuple[int, int]) -> np.ndarray:
    """Extend an image smaller than the tile by reflection at the bottom and right, so that a
    small image is seen at its own scale (the prediction is cropped back afterwards)."""
    pad_y, pad_x = max(tile[0] - image.shape[0], 0), max(tile[1] - image.shape[1], 0)
    if not (pad_y or pad_x):
        return image
    return np.pad(image, ((0, pad_y), (0, pad_x), (0, 0)), mode="reflect")


def predict_tiles(predict_fixed: FixedSizePredictor, pixels: np.ndarray, tta: bool) -> np.ndarray:
    """Probabilities [B,h,w,K] for model-size pixels [B,h,w,c]; with `tta`, the mean over the
    four flips of each tile (TTA_VIEWS["flips"]: flips keep any tile shape, turns don't), each
    mapped back; the views go to the model in one call."""
    if not tta:
        return predict_fixed(pixels)
    count, views = len(pixels), TTA_VIEWS["flips"]
    probabilities = predict_fixed(np.concatenate([to_view(pixels, turns, flip) for turns, flip in views]))
    return np.mean([from_view(probabilities[index * count:(index + 1) * count], turns, flip) for index, (turns, flip) in enumerate(views)], axis=0)


def _batches(items: Sequence[tuple[int, int]], size: int) -> Iterator[Sequence[tuple[int, int]]]:
    for first in range(0, len(items), size):
        yield items[first:first + size]


def _tiled_probabilities(predict_fixed: FixedSizePredictor, pixels: np.ndarray, spec: ServingSpec, overlap: float, tta: bool, batch: int) -> np.ndarray:
    """Probabilities [H,W,K] of raw pixels [H,W,C] (any dtype), blended over model-size tiles."""
    height, width = pixels.shape[:2]
    tile = spec.shape[:2]
    canvas = pad_to_tile(pixels, tile)
    size = canvas.shape[:2]
    margins = (overlap_pixels(overlap, tile[0]), overlap_pixels(overlap, tile[1]))
    starts = [(y, x) for y in tile_positions(size[0], tile[0], margins[0]) for x in tile_positions(size[1], tile[1], margins[1])]
    total = np.zeros((*size, output_classes(spec)), np.float32)
    weights = np.zeros(size, np.float32)
    for group in _batches(starts, batch):
        raw = np.stack([canvas[y:y + tile[0], x:x + tile[1]] for y, x in group])
        probabilities = predict_tiles(predict_fixed, model_pixels(tf.constant(raw), spec.shape).numpy(), tta)
        for (y, x), tile_probabilities in zip(group, probabilities):
            window = blend_window((y, x), tile, size, margins)
            total[y:y + tile[0], x:x + tile[1]] += tile_probabilities * window[..., None]
            weights[y:y + tile[0], x:x + tile[1]] += window
    return (total / weights[..., None])[:height, :width]


def predict_probabilities(
    predict_fixed: FixedSizePredictor,
    image: np.ndarray,
    spec: ServingSpec,
    overlap: float = DEFAULT_OVERLAP,
    tta: bool = False,
    batch: int = DEFAULT_BATCH,
    scale: tuple[float, float] = NATIVE_SCALE,
) -> np.ndarray:
    """Class probabilities [H,W,K] for a raw HxWxC image of any size, blended over tiles.
    With a `scale` other than 1 (the training scale of a model trained on images resized
    to its size), the image is resampled by it first, with the training resize, and the
    probabilities are resized back to the image's own size, as `serving_default` does."""
    if scale == NATIVE_SCALE:
        return _tiled_probabilities(predict_fixed, image, spec, overlap, tta, batch)
    height, width = image.shape[:2]
    scaled = (max(1, round(height * scale[0])), max(1, round(width * scale[1])), spec.shape[2])
    pixels = model_pixels(tf.constant(image[None]), scaled).numpy()[0]
    probabilities = _tiled_probabilities(predict_fixed, pixels, spec, overlap, tta, batch)
    return resize_back(tf.constant(probabilities[None]), (height, width)).numpy()[0]


def probabilities_to_mask(probabilities: np.ndarray, spec: ServingSpec, threshold: float | None = None) -> np.ndarray:
    """Class ids [H,W] uint8: the argmax, or for a sigmoid head foreground where p > threshold
    (0.5 by default, which is the argmax of the served [1-p, p])."""
    check_threshold(spec, threshold)
    if spec.sigmoid:
        return (probabilities[..., 1] > (0.5 if threshold is None else threshold)).astype(np.uint8)
    return probabilities.argmax(axis=-1).astype(np.uint8)


def check_threshold(spec: ServingSpec, threshold: float | None) -> None:
    """A softmax model has no single foreground probability to threshold: refuse, don't ignore."""
    if threshold is not None and not spec.sigmoid:
        raise PredictError("a threshold applies only to sigmoid (binary, `classes: 1`) models; this model has a softmax head")


def predict_large_image(
    predict_fixed: FixedSizePredictor,
    image: np.ndarray,
    spec: ServingSpec,
    overlap: float = DEFAULT_OVERLAP,
    tta: bool = False,
    threshold: float | None = None,
    batch: int = DEFAULT_BATCH,
    scale: tuple[float, float] = NATIVE_SCALE,
) -> np.ndarray:
    """Class ids [H,W] for a raw HxWxC image of any size (see the module docstring)."""
    return probabilities_to_mask(predict_probabilities(predict_fixed, image, spec, overlap, tta, batch, scale), spec, threshold)


# --- post-processing and output formats ------------------------------------------------------


def remove_small_regions(mask: np.ndarray, min_object: int = 0, min_hole: int = 0) -> np.ndarray:
    """Relabel connected regions (4-connectivity) smaller than the limits: regions of a class
    other than 0 below `min_object` pixels (objects) and regions of class 0 below `min_hole`
    (holes). Each removed pixel takes the class of the nearest kept pixel, so a speck
    disappears into what surrounds it and a hole is filled by its object, for any number
    of classes. A mask made only of small regions is returned unchanged."""
    from scipy import ndimage

    if not (min_object or min_hole):
        return mask
    removed = np.zeros(mask.shape, bool)
    for class_id in np.unique(mask):
        limit = min_hole if class_id == 0 else min_object
        if limit <= 1:
            continue
        labels, _ = ndimage.label(mask == class_id)
        small = np.bincount(labels.ravel()) < limit
        small[0] = False  # label 0 is every other class
        removed |= small[labels]
    if not removed.any() or removed.all():
        return mask
    nearest = ndimage.distance_transform_edt(removed, return_distances=False, return_indices=True)
    return mask[tuple(nearest)]


def rle_encode(binary: np.ndarray) -> str:
    """Kaggle run-length encoding of a 2D boolean mask: 1-based starts, column-major."""
    flat = np.concatenate([[0], binary.flatten(order="F").astype(np.int8), [0]])
    runs = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs[1::2] -= runs[::2]
    return " ".join(map(str, runs))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """The boolean [H,W] mask of an `rle_encode` string (to read `rle.csv` back)."""
    flat = np.zeros(shape[0] * shape[1], bool)
    values = np.array(rle.split(), np.int64)
    for start, length in zip(values[0::2] - 1, values[1::2]):
        flat[start:start + length] = True
    return flat.reshape(shape, order="F")


def rle_rows(filename: str, mask: np.ndarray, spec: ServingSpec) -> list[tuple[str, int, str]]:
    """One (filename, class, rle) row per class 1..K-1; class 0 is what no row covers."""
    return [(filename, class_id, rle_encode(mask == class_id)) for class_id in range(1, output_classes(spec))]


def overlay(image: np.ndarray, mask: np.ndarray, spec: ServingSpec) -> np.ndarray:
    """An RGB uint8 picture of the image (scaled by the model's value range) with every class
    but 0 tinted in its palette colour."""
    pixels = to_model_channels(scale_pixels(tf.constant(image, tf.float32), spec.value_max), 3).numpy()
    picture = np.clip(pixels * 255.0, 0.0, 255.0)
    coloured = mask > 0
    colours = PALETTE[(mask[coloured].astype(np.int64) - 1) % len(PALETTE)]
    picture[coloured] = (1.0 - OVERLAY_ALPHA) * picture[coloured] + OVERLAY_ALPHA * colours
    return np.round(picture).astype(np.uint8)


# --- models, specs and inputs ----------------------------------------------------------------


def _is_saved_model(folder: Path) -> bool:
    return (folder / "saved_model.pb").is_file()


def resolve_saved_model(folder: Path) -> tuple[Path, str]:
    """The SavedModel a folder stands for: the folder itself, a trainer model folder, a run
    folder (its served model, what the evaluator scored) or an exports folder or pushed
    version (its saved_model export)."""
    candidates = [
        (folder, "SavedModel folder"),
        (folder / SERVING_SUBDIR, f"trainer model folder: its {SERVING_SUBDIR}"),
        (folder / RUN_SERVED_MODEL, f"run folder: its served model {RUN_SERVED_MODEL}"),
        (folder / SAVED_MODEL_EXPORT, f"exports folder: its {SAVED_MODEL_EXPORT} export"),
    ]
    for path, note in candidates:
        if _is_saved_model(path):
            return path, note
    exports = sorted(item.name for item in folder.iterdir() if item.suffix in MODEL_FILES)
    hint = f"; model files here: {', '.join(exports)} (pass one of them)" if exports else ""
    raise PredictError(
        f"{folder}: no SavedModel found (looked for saved_model.pb in {', '.join(str(path) for path, _ in candidates)}){hint}"
    )


def find_spec(model_file: Path) -> Path:
    """The serving_spec.json for a TFLite or ONNX file: beside it, in the saved_model export
    beside it (an exports folder or pushed version), or in the run's served model when the
    file sits in <run>/exporter/exports/."""
    run = model_file.parent.parent.parent if model_file.parent.parent.name == RUN_EXPORTS.parts[0] else None
    candidates = [model_file.parent, model_file.parent / SAVED_MODEL_EXPORT] + ([run / RUN_SERVED_MODEL] if run else [])
    for folder in candidates:
        if (folder / SPEC_FILE).is_file():
            return folder / SPEC_FILE
    raise PredictError(
        f"{model_file}: no {SPEC_FILE} found (looked in {', '.join(str(folder) for folder in candidates)}); "
        f"pass --spec with the {SPEC_FILE} of the model it was exported from"
    )


def _load_spec(spec_path: Path) -> ServingSpec:
    folder = spec_path if spec_path.is_dir() else spec_path.parent
    if spec_path.is_file() and spec_path.name != SPEC_FILE:
        raise PredictError(f"{spec_path}: a spec must be a file named {SPEC_FILE} (or the folder holding it)")
    try:
        return ServingSpec.load(folder)
    except FileNotFoundError:
        raise PredictError(f"{folder}: no {SPEC_FILE} in it") from None
    except (KeyError, TypeError, ValueError) as error:
        raise PredictError(f"{folder / SPEC_FILE}: not a valid serving spec ({type(error).__name__}: {error})") from None


def load_model(model: str | os.PathLike[str], spec: str | os.PathLike[str] | None = None) -> LoadedModel:
    """A SavedModel (or a folder holding one: see resolve_saved_model), a .tflite or an .onnx
    file, with its spec (`spec` overrides the one found with the model); checked with one
    model-size input, so that a spec that does not fit fails before any image is read."""
    path = Path(model)
    if not path.exists():
        raise PredictError(f"{path}: no such model file or folder")
    if path.is_dir():
        path, note = resolve_saved_model(path)
        kind = "saved_model"
    elif path.suffix in MODEL_FILES:
        kind, note = MODEL_FILES[path.suffix]
    else:
        raise PredictError(f"{path}: not a model (expected a SavedModel folder, a run or exports folder, or a .tflite or .onnx file)")
    serving_spec, spec_source = _spec_for(kind, path, spec)
    predict_fixed = _predictor(kind, path)
    _check(predict_fixed, serving_spec, path, spec_source)
    return LoadedModel(predict_fixed, serving_spec, kind, path, spec_source, note, *training_scale(path, serving_spec))


def _spec_for(kind: str, path: Path, spec: str | os.PathLike[str] | None) -> tuple[ServingSpec, str]:
    """The spec and where it came from: `spec`, else the SavedModel's own, else the one an
    ONNX export carries in its metadata, else the one in the export's sidecar JSON, else a
    serving_spec.json found with the file."""
    if spec is not None:
        return _load_spec(Path(spec)), str(spec)
    if kind == "saved_model":
        return _load_spec(path / SPEC_FILE), str(path / SPEC_FILE)
    if kind == "onnx":
        embedded = _onnx_spec(path)
        if embedded is not None:
            return embedded
    beside = _sidecar_spec(path)
    if beside is not None:
        return beside
    found = find_spec(path)
    return _load_spec(found), str(found)


def _parse_spec(text: str, source: str) -> tuple[ServingSpec, str]:
    """A serving spec held in some other record (JSON text), through ServingSpec.load, the one
    parser of a spec."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / SPEC_FILE).write_text(text)
        try:
            return ServingSpec.load(folder), source
        except (KeyError, TypeError, ValueError) as error:
            raise PredictError(f"{source}: not a valid serving spec ({type(error).__name__}: {error})") from None


def _sidecar_spec(path: Path) -> tuple[ServingSpec, str] | None:
    """The spec in the sidecar JSON the Exporter writes beside each export (<file>.json), so
    that a TFLite file and its sidecar suffice (a pushed version without the saved_model)."""
    from segflow.export.exporters import sidecar_name

    sidecar = path.with_name(sidecar_name(path.name))
    if not sidecar.is_file():
        return None
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError) as error:
        raise PredictError(f"{sidecar}: cannot read the export's sidecar JSON ({type(error).__name__}: {error})") from None
    if not isinstance(record, dict) or "serving_spec" not in record:
        return None
    return _parse_spec(json.dumps(record["serving_spec"]), f"{sidecar} (serving_spec)")


def _onnx_spec(path: Path) -> tuple[ServingSpec, str] | None:
    """The spec the onnx export stores in the model's metadata, so that the file alone suffices."""
    import onnx

    from segflow.export.exporters import ONNX_SPEC_PROPERTY

    try:
        properties = {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as error:  # protobuf and onnx raise several types for a damaged file
        raise PredictError(f"{path}: cannot read the ONNX model ({type(error).__name__}: {error})") from None
    if ONNX_SPEC_PROPERTY not in properties:
        return None
    return _parse_spec(properties[ONNX_SPEC_PROPERTY], f"{path} (metadata {ONNX_SPEC_PROPERTY})")


def training_scale(model: Path, spec: ServingSpec) -> tuple[tuple[float, float] | None, str]:
    """The factor by which training resized its images to the model size, from the run's
    statistics when the model sits in a run folder (its served model or an export) and every
    train image had one size. A model trained on 512x512 images at 256x256 has learnt
    objects at half their size in the files, so predicting at the files' own resolution
    would show it objects twice too large."""
    from segflow.data.examples import read_statistics

    if spec.resize == "none":
        return NATIVE_SCALE, "trained on crops at full resolution (patches.resize none)"
    statistics = model.parents[2] / RUN_STATISTICS if len(model.parents) > 2 else None
    if statistics is None or not statistics.is_dir():
        return None, "training image size unknown outside a run folder"
    try:
        sizes = list(read_statistics(statistics)["train"]["image_sizes"])
    except (OSError, ValueError, KeyError) as error:  # a damaged run: predict at native resolution, and say why
        return None, f"cannot read the training image size ({error})"
    if len(sizes) != 1:
        return None, f"train images had {len(sizes)} sizes ({', '.join(sizes[:3])}{', ...' if len(sizes) > 3 else ''})"
    height, width = map(int, sizes[0].split("x"))
    if spec.resize == "resize_with_pad":  # one factor for both sides: the aspect ratio was kept
        factor = min(spec.shape[0] / height, spec.shape[1] / width)
        return (factor, factor), f"train images were {height}x{width}, fitted into {spec.shape[0]}x{spec.shape[1]} with padding"
    return (spec.shape[0] / height, spec.shape[1] / width), f"train images were {height}x{width}, resized to {spec.shape[0]}x{spec.shape[1]}"


def _predictor(kind: str, path: Path) -> FixedSizePredictor:
    """The model-size predictor of each runtime (the tflite and onnx exports' own loaders)."""
    from segflow.export.exporters import onnx_predictor, tflite_predictor

    try:
        return {"saved_model": saved_model_predictor, "tflite": tflite_predictor, "onnx": onnx_predictor}[kind](path)
    except Exception as error:  # each runtime raises its own types for a broken model
        raise PredictError(f"{path}: cannot load the {kind} model ({type(error).__name__}: {error})") from None


def _check(predict_fixed: FixedSizePredictor, spec: ServingSpec, path: Path, spec_source: str) -> None:
    """One blank model-size input: a spec that does not match the model fails here, by name."""
    classes = output_classes(spec)
    try:
        shape = predict_fixed(np.zeros((1, *spec.shape), np.float32)).shape
    except Exception as error:  # runtimes raise their own types for a wrong input shape
        raise PredictError(f"{path}: does not run on {list(spec.shape)} input as {spec_source} says ({type(error).__name__}: {error})") from None
    if tuple(shape) != (1, *spec.shape[:2], classes):
        raise PredictError(f"{path}: gives probabilities of shape {list(shape)}, but {spec_source} says {list(spec.shape[:2])} and {classes} classes")


def parse_scale(text: str) -> tuple[float, float] | None:
    """`auto` (None: the training scale when known), a factor, or `FY,FX` per axis."""
    if text == "auto":
        return None
    try:
        factors = tuple(float(part) for part in text.split(","))
    except ValueError:
        factors = ()
    if len(factors) not in (1, 2) or not all(0 < factor < float("inf") for factor in factors):
        raise PredictError(f"scale must be auto, a positive factor or two (FY,FX), not {text!r}")
    return (factors[0], factors[-1])


def list_inputs(source: str | os.PathLike[str]) -> list[Path]:
    """One image file, or the image files of a folder (by extension, sorted, not recursive)."""
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PredictError(f"{path}: no such image file or folder")
    files = sorted(item for item in path.iterdir() if item.is_file() and not item.name.startswith(".") and item.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PredictError(f"{path}: no images in it (looked for {', '.join(IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for item in files:
        if item.stem in stems:
            raise PredictError(f"{item} and {stems[item.stem]} have the same stem, so their outputs would overwrite each other; rename one")
        stems[item.stem] = item
    return files


# --- the command -----------------------------------------------------------------------------


def resolve_scale(options: PredictOptions, model: LoadedModel) -> tuple[tuple[float, float], str]:
    """The scale to predict at and where it came from: the option, else the training scale."""
    if options.scale is not None:
        return options.scale, "--scale"
    return model.training_scale or NATIVE_SCALE, model.scale_note


def predict_files(
    model: LoadedModel, inputs: Iterable[Path], output: str | os.PathLike[str], formats: Sequence[str], options: PredictOptions
) -> dict[str, Any]:
    """Predict every input and write the chosen formats and `predict.json` into `output`.
    An unreadable input is reported (stderr and `skipped`) and the others go on."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise PredictError(f"unknown output format(s) {unknown or formats}; choose from {', '.join(FORMATS)}")
    check_threshold(model.spec, options.threshold)
    scale, scale_source = resolve_scale(options, model)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    files = list(inputs)
    started = time.perf_counter()
    written: list[str] = []
    skipped: list[dict[str, str]] = []
    rows: list[tuple[str, int, str]] = []
    for path in progress(files, "predict", unit="images") if len(files) > 1 else files:  # no bar for one input
        try:
            image = read_image(path)
        except ImageReadError as error:
            skipped.append({"file": str(path), "reason": str(error)})
            console.line(f"predict: skipped {error}")
            continue
        if image.max() > model.spec.value_max:
            console.line(f"predict: warning: {path}: pixel values up to {int(image.max())} exceed the model's value range (value_max {model.spec.value_max:g})")
        mask = predict_large_image(model.predict_fixed, image, model.spec, options.overlap, options.tta, options.threshold, options.batch, scale)
        mask = remove_small_regions(mask, options.min_object, options.min_hole)
        if "png" in formats:
            write_bytes(out / f"{path.stem}.png", encode_png(mask[..., None]))
        if "overlay" in formats:
            write_bytes(out / f"{path.stem}_overlay.png", encode_png(overlay(image, mask, model.spec)))
        if "rle" in formats:
            rows.extend(rle_rows(path.name, mask, model.spec))
        written.append(str(path))
    if "rle" in formats:
        table = io.StringIO()
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(("filename", "class", "rle"))
        writer.writerows(rows)
        write_bytes(out / RLE_FILE, table.getvalue().encode())
    report = {
        "model": str(model.path),
        "model_kind": model.kind,
        "spec": model.spec_source,
        "class_names": list(model.spec.class_names),
        "formats": list(formats),
        "options": asdict(options),
        "scale": list(scale),
        "scale_source": scale_source,
        "images": len(files),
        "written": len(written),
        "skipped": skipped,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(out / REPORT_FILE, report)
    return report
