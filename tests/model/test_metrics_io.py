"""Confusion-matrix metrics, image decoding and crash-safe writes."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from segflow.utils.io import ImageReadError, atomic_dir, decode_image, decode_mask, encode_png
from segflow.model.metrics import ConfusionMatrix


def test_confusion_matrix_metrics_by_hand() -> None:
    matrix = ConfusionMatrix(2, ignore_index=255)
    labels = np.array([[0, 0, 1, 1], [1, 255, 255, 0]])
    predictions = np.array([[0, 1, 1, 1], [0, 0, 1, 0]])
    matrix.update(labels, predictions)
    report = matrix.report(["bg", "fg"])
    # class 0: TP 2, FP 1, FN 1 -> IoU 2/4; class 1: TP 2, FP 1, FN 1 -> IoU 2/4
    assert report["per_class_iou"] == {"bg": 0.5, "fg": 0.5}
    assert report["mean_iou"] == 0.5 and report["pixels"] == 6
    assert report["per_class_precision"]["bg"] == pytest.approx(2 / 3)
    assert report["per_class_recall"]["fg"] == pytest.approx(2 / 3)


def test_absent_class_is_excluded_from_mean() -> None:
    matrix = ConfusionMatrix(3)
    matrix.update(np.array([0, 0, 1]), np.array([0, 0, 1]))
    report = matrix.report()
    assert report["mean_iou"] == 1.0 and np.isnan(report["per_class_iou"]["2"])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_round_trip_keeps_depth_and_channels(dtype: type, channels: int) -> None:
    image = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, size=(5, 7, channels)).astype(dtype)
    np.testing.assert_array_equal(decode_image(encode_png(image)), image)


def test_tiff_and_jpeg_decode(tmp_path: Path) -> None:
    image16 = np.random.default_rng(0).integers(0, 65535, size=(6, 6)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", image16)
    np.testing.assert_array_equal(decode_image((tmp_path / "a.tif").read_bytes())[:, :, 0], image16)
    cv2.imwrite(str(tmp_path / "b.jpg"), np.full((8, 8, 3), 128, np.uint8))
    assert decode_image((tmp_path / "b.jpg").read_bytes()).shape == (8, 8, 3)


def test_corrupt_file_error_names_the_file() -> None:
    with pytest.raises(ImageReadError, match="broken.png"):
        decode_image(b"\x89PNG\r\n\x1a\n garbage", "broken.png")


def test_palette_mask_keeps_indices() -> None:
    import io

    picture = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    picture.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    np.testing.assert_array_equal(decode_mask(buffer.getvalue()), [[0, 1], [2, 1]])


def test_colour_mask_is_rejected() -> None:
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    with pytest.raises(ImageReadError, match="colour-coded mask"):
        decode_mask(encode_png(colour), "m.png")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "artifact") as out:
            (out / "half-written").write_text("x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "artifact") as out:
        (out / "done").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]
