"""`segflow predict`: tiling, blending, post-processing, output formats and bad inputs.

The seam test saves a random-initialised U-Net at 256x256 through segflow's own serving
code (the real signatures and serving_spec.json) and compares the tiled prediction of a
1024x1024 image with the same weights run on the whole image at once.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from segflow.cli import main
from segflow.data.preprocessing import RAW_FEATURE, TRANSFORMED_FEATURE
from segflow.utils.io import decode_mask, encode_png, read_image
from segflow.model.models import ModelSpec, build_model
from segflow.export.predict import (
    PredictError,
    blend_window,
    load_model,
    predict_large_image,
    probabilities_to_mask,
    remove_small_regions,
    rle_decode,
    rle_encode,
    tile_positions,
)
from segflow.data.preprocessing import model_pixels
from segflow.utils.registry import EXPORT_FORMATS
from segflow.export.serving import SERVING_SUBDIR, SPEC_FILE, SegmentationServer, ServingSpec, serving_mask_predictor
from segflow.utils.io import write_json

MODEL_SIZE = 256
CLASSES = ("background", "cell", "border")


class FixedStandardisation(tf.Module):
    """Stands in for the TFT layer (no Beam analysis needed): a fixed affine map, called
    by the served model exactly where the TFT layer would be."""

    def __call__(self, features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {TRANSFORMED_FEATURE: (features[RAW_FEATURE] - 0.5) * 4.0}


def spec_at(size: int) -> ServingSpec:
    return ServingSpec((size, size, 1), CLASSES, False, None, "uint8", 255.0)


def server_at(size: int, weights: list[np.ndarray] | None = None) -> SegmentationServer:
    """The U-Net at `size`, random-initialised (seeded) or with the given weights: a fully
    convolutional network's weights do not depend on the input size."""
    tf.keras.utils.set_random_seed(0)
    network = build_model("unet", ModelSpec((size, size, 1), len(CLASSES), depth=2, base_filters=4))
    if weights is not None:
        network.set_weights(weights)
    return SegmentationServer(network, FixedStandardisation(), spec_at(size))


def textured_image(height: int, width: int, seed: int, channels: int = 1, dtype: Any = np.uint8) -> np.ndarray:
    """Smooth blobs and fine noise, so that a random network predicts every class."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=(height, width, channels)), (6, 6, 0))
    image = 128 + 100 * smooth / smooth.std() + rng.normal(0, 10, smooth.shape)
    return np.clip(image, 0, 255).astype(dtype)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A served model at 256x256 and an exports folder (saved_model, tflite_fp32, onnx) built
    from it by the registry's own builders, the layout the exporter writes."""
    root = tmp_path_factory.mktemp("predict_models")
    server = server_at(MODEL_SIZE)
    serving = server.save(root / "model")
    exports = root / "exports"
    exports.mkdir()
    files = {}
    for name in ("saved_model", "tflite_fp32", "onnx"):
        export = EXPORT_FORMATS.get(name)
        export.build(serving, exports / export.file_name, None)
        files[name] = exports / export.file_name
    return {"server": server, "serving": serving, "exports": exports, "tflite": files["tflite_fp32"], "onnx": files["onnx"]}


def whole_image_mask(server: SegmentationServer, image: np.ndarray) -> np.ndarray:
    """The reference: the same weights at the image's own size, one pass, no tiles."""
    height, width = image.shape[:2]
    assert height == width
    whole = server_at(height, server.network.get_weights())
    probabilities = whole.fixed_size(model_pixels(tf.constant(image[None]), whole.spec.shape))["probabilities"]
    return probabilities.numpy()[0].argmax(axis=-1).astype(np.uint8)


def pixelwise_predictor(pixels: np.ndarray) -> np.ndarray:
    """A model without context: probabilities from each pixel alone, so tiling must
    reproduce the whole-image answer exactly (positions, blending, padding, flips)."""
    value = pixels[..., :1] / 255.0
    return np.concatenate([value, 1.0 - value, np.full_like(value, 0.25)], axis=-1)


@pytest.mark.parametrize(("size", "tile", "overlap"), [(1024, 256, 64), (1000, 256, 64), (257, 256, 0), (256, 256, 64), (100, 256, 64), (700, 256, 200)])
def test_tile_positions_cover_the_image(size: int, tile: int, overlap: int) -> None:
    starts = tile_positions(size, tile, overlap)
    covered = np.zeros(max(size, tile), int)
    for start in starts:
        covered[start:start + tile] += 1
    assert covered[:size].min() >= 1
    assert starts[0] == 0 and starts[-1] + tile == max(size, tile)  # never past the (padded) image
    assert all(later - earlier <= tile - overlap for earlier, later in zip(starts, starts[1:]))  # neighbours share >= overlap


@pytest.mark.parametrize(("size", "overlap", "regular"), [(1024, 64, True), (1000, 64, False), (600, 200, False), (300, 3, False)])
def test_blend_weights_sum_to_one_on_a_regular_grid_and_stay_positive_elsewhere(size: int, overlap: int, regular: bool) -> None:
    starts = tile_positions(size, 256, overlap)
    total = np.zeros((size, size))
    for y in starts:
        for x in starts:
            total[y:y + 256, x:x + 256] += blend_window((y, x), (256, 256), (size, size), (overlap, overlap))
    if regular:  # tiles 192 apart: the raised-cosine ramps form a partition of unity
        np.testing.assert_allclose(total, 1.0, atol=1e-6)
    assert total.min() >= 0.5  # every pixel, borders and corners included, is well inside some tile


@pytest.mark.parametrize(("overlap", "tta"), [(0.25, False), (0.25, True), (0.6, False), (0.0, False)])
@pytest.mark.parametrize(("height", "width"), [(1000, 777), (100, 70), (256, 300)])
def test_tiling_reproduces_a_context_free_model_exactly(height: int, width: int, overlap: float, tta: bool) -> None:
    image = textured_image(height, width, seed=height, channels=3)
    spec = ServingSpec((256, 256, 3), CLASSES, False, None, "uint8", 255.0)
    mask = predict_large_image(pixelwise_predictor, image, spec, overlap=overlap, tta=tta)
    expected = pixelwise_predictor(image.astype(np.float32)).argmax(axis=-1)
    assert mask.shape == (height, width)
    np.testing.assert_array_equal(mask, expected)


def test_cli_on_1024_image_with_256_model_has_no_seams(models: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = textured_image(1024, 1024, seed=1)
    (tmp_path / "big.png").write_bytes(encode_png(image))
    assert main(["predict", str(models["serving"]), str(tmp_path / "big.png"), "-o", str(tmp_path / "out")]) == 0
    assert "Format-Serving" in capsys.readouterr().err  # says which model it used
    tiled = decode_mask((tmp_path / "out" / "big.png").read_bytes())
    reference = whole_image_mask(models["server"], image)
    assert tiled.shape == (1024, 1024)
    assert np.bincount(reference.ravel()).max() < 0.9 * reference.size  # not a constant answer
    agreement = float(np.mean(tiled == reference))
    assert agreement >= 0.995, agreement


def test_tflite_export_with_its_spec_from_the_exports_folder(models: dict[str, Any], tmp_path: Path) -> None:
    loaded = load_model(models["tflite"])
    assert loaded.kind == "tflite" and loaded.spec_source == str(models["exports"] / "saved_model" / SPEC_FILE)
    image = textured_image(300, 520, seed=2, channels=3)  # colour into a grey model: the one channel conversion
    served = load_model(models["exports"])
    assert served.path == models["exports"] / "saved_model"
    from_tflite = predict_large_image(loaded.predict_fixed, image, loaded.spec)
    from_saved_model = predict_large_image(served.predict_fixed, image, served.spec)
    assert from_tflite.shape == (300, 520)
    assert np.mean(from_tflite == from_saved_model) >= 0.995


def test_onnx_export_alone_carries_its_spec(models: dict[str, Any], tmp_path: Path) -> None:
    alone = tmp_path / "model.onnx"
    shutil.copy(models["onnx"], alone)
    loaded = load_model(alone)
    assert loaded.kind == "onnx" and loaded.spec == spec_at(MODEL_SIZE) and "metadata" in loaded.spec_source
    image = textured_image(600, 400, seed=7)
    served = load_model(models["serving"])
    from_onnx = predict_large_image(loaded.predict_fixed, image, loaded.spec)
    assert np.mean(from_onnx == predict_large_image(served.predict_fixed, image, served.spec)) >= 0.999


def test_a_tflite_file_and_its_sidecar_suffice(models: dict[str, Any], tmp_path: Path) -> None:
    """A pushed version may hold model_fp32.tflite and its sidecar JSON but no saved_model."""
    from segflow.export.exporters import sidecar, sidecar_name
    from segflow.utils.io import write_json

    alone = tmp_path / "model_fp32.tflite"
    shutil.copy(models["tflite"], alone)
    spec = ServingSpec.load(models["serving"])
    write_json(tmp_path / sidecar_name(alone.name), sidecar(EXPORT_FORMATS.get("tflite_fp32"), alone, spec, {"name": "tiny"}, None))
    loaded = load_model(alone)
    assert loaded.spec == spec and loaded.spec_source == f"{tmp_path / sidecar_name(alone.name)} (serving_spec)"


def test_a_tflite_file_without_a_spec_names_the_file_and_the_option(models: dict[str, Any], tmp_path: Path) -> None:
    alone = tmp_path / "model.tflite"
    shutil.copy(models["tflite"], alone)
    with pytest.raises(PredictError, match=r"model\.tflite: no serving_spec\.json found .* --spec"):
        load_model(alone)
    assert load_model(alone, spec=models["serving"] / SPEC_FILE).spec == spec_at(MODEL_SIZE)


def test_at_the_training_scale_a_model_size_image_is_served_as_serving_default_serves_it(models: dict[str, Any]) -> None:
    """A 512x512 image at scale 0.5 is one 256x256 tile: the same resize, model and resize
    back as `serving_default`, so the masks agree."""
    image = textured_image(512, 512, seed=6)
    loaded = load_model(models["serving"])
    tiled = predict_large_image(loaded.predict_fixed, image, loaded.spec, scale=(0.5, 0.5))
    assert np.mean(tiled == serving_mask_predictor(models["serving"])(image)) >= 0.999


@pytest.mark.parametrize(("sizes", "expected"), [({"512x1024": 5}, (0.5, 0.25)), ({"512x512": 3, "300x300": 1}, None)])
def test_training_scale_comes_from_the_run_statistics(models: dict[str, Any], tmp_path: Path, sizes: dict[str, int], expected: tuple[float, float] | None) -> None:
    run = tmp_path / "run"
    shutil.copytree(models["serving"], run / "trainer" / "model" / SERVING_SUBDIR)
    write_json(run / "statistics_gen" / "statistics" / "statistics.json", {"train": {"image_sizes": sizes}, "eval": {"image_sizes": sizes}})
    loaded = load_model(run)
    assert loaded.path == run / "trainer" / "model" / SERVING_SUBDIR
    assert loaded.training_scale == expected
    assert load_model(models["serving"]).training_scale is None  # no run around it: native resolution


def test_folder_with_a_corrupt_file_skips_it_and_writes_the_rest(models: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "grey16.png").write_bytes(encode_png(textured_image(300, 280, seed=3, dtype=np.uint16)))
    (folder / "small_rgba.png").write_bytes(encode_png(textured_image(100, 70, seed=4, channels=4)))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a picture")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(["predict", str(models["serving"]), str(folder), "-o", str(out), "--format", "png", "--format", "rle"]) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "not a decodable image" in err
    report = json.loads((out / "predict.json").read_text())
    assert report["written"] == 2 and [Path(entry["file"]).name for entry in report["skipped"]] == ["broken.png"]
    assert decode_mask((out / "grey16.png").read_bytes()).shape == (300, 280)
    assert decode_mask((out / "small_rgba.png").read_bytes()).shape == (100, 70)  # padded, not resized
    assert not (out / "broken.png").exists() and not list(out.glob(".*"))  # no temporary files left

    with (out / "rle.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert {row["filename"] for row in rows} == {"grey16.png", "small_rgba.png"}
    for name in ("grey16", "small_rgba"):
        mask = decode_mask((out / f"{name}.png").read_bytes())
        decoded = np.zeros_like(mask)
        for row in rows:
            if row["filename"] == f"{name}.png":
                decoded[rle_decode(row["rle"], mask.shape)] = int(row["class"])
        np.testing.assert_array_equal(decoded, mask)


def test_rle_follows_the_kaggle_convention() -> None:
    mask = np.array([[0, 1, 1], [1, 1, 0]], bool)  # column-major: 0 1 | 1 1 | 1 0
    assert rle_encode(mask) == "2 4"
    assert rle_encode(np.zeros((3, 3), bool)) == ""
    np.testing.assert_array_equal(rle_decode("2 4", (2, 3)), mask)


def test_min_object_and_min_hole_removal() -> None:
    mask = np.zeros((60, 60), np.uint8)
    mask[10:40, 10:40] = 1  # a large object ...
    mask[20:22, 20:22] = 0  # ... with a 4-pixel hole
    mask[50:53, 50:53] = 2  # a 9-pixel speck of another class
    mask[2:12, 45:55] = 2  # a 100-pixel object of that class
    cleaned = remove_small_regions(mask, min_object=10, min_hole=5)
    assert (cleaned[50:53, 50:53] == 0).all()  # the speck went into the background
    assert (cleaned[10:40, 10:40] == 1).all()  # the hole was filled by its object
    assert (cleaned[2:12, 45:55] == 2).all()
    np.testing.assert_array_equal(remove_small_regions(mask), mask)


def test_min_object_through_the_cli(models: dict[str, Any], tmp_path: Path) -> None:
    image = textured_image(200, 200, seed=5)
    (tmp_path / "a.png").write_bytes(encode_png(image))
    assert main(["predict", str(models["serving"]), str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--min-object", "50", "--min-hole", "50", "--format", "overlay"]) == 0
    assert read_image(tmp_path / "out" / "a_overlay.png").shape == (200, 200, 3)
    raw = load_model(models["serving"])
    mask = remove_small_regions(predict_large_image(raw.predict_fixed, image, raw.spec), 50, 50)
    for class_id in range(len(CLASSES)):
        labels, _ = ndimage.label(mask == class_id)
        assert np.bincount(labels.ravel())[1:].min(initial=50) >= 50


def test_sigmoid_models_threshold_and_softmax_models_refuse_one() -> None:
    probabilities = np.stack([np.array([[0.9, 0.4], [0.3, 0.55]]), np.array([[0.1, 0.6], [0.7, 0.45]])], axis=-1)
    sigmoid = ServingSpec((2, 2, 1), ("foreground",), True, None, "uint8", 255.0)
    np.testing.assert_array_equal(probabilities_to_mask(probabilities, sigmoid), [[0, 1], [1, 0]])
    np.testing.assert_array_equal(probabilities_to_mask(probabilities, sigmoid, threshold=0.65), [[0, 0], [1, 0]])
    with pytest.raises(PredictError, match="sigmoid"):
        probabilities_to_mask(probabilities, ServingSpec((2, 2, 1), ("a", "b"), False, None, "uint8", 255.0), threshold=0.5)


@pytest.mark.parametrize(("resize", "expected"), [("none", (1.0, 1.0)), ("resize_with_pad", (0.25, 0.25)), ("resize", (0.5, 0.25))])
def test_training_scale_follows_how_the_model_was_fed(models: dict[str, Any], tmp_path: Path, resize: str, expected: tuple[float, float]) -> None:
    """Crops at full resolution: native scale; fitted with padding: one factor for both sides."""
    from dataclasses import replace

    from segflow.export.predict import training_scale

    spec = replace(ServingSpec.load(models["serving"]), resize=resize)
    statistics = tmp_path / "run" / "statistics_gen" / "statistics"
    write_json(statistics / "statistics.json", {"train": {"image_sizes": {f"{spec.shape[0] * 2}x{spec.shape[1] * 4}": 5}}})
    model = tmp_path / "run" / "trainer" / "model" / SERVING_SUBDIR
    assert training_scale(model, spec)[0] == expected
