"""MediaPipe Tasks runs segflow's TFLite exports as they are: the session's tiny trained model
and a 1-channel one, exported to tflite_fp32 and tflite_int8 by the Exporter; MediaPipe's
Python ImageSegmenter (in its own environment, .venv-mediapipe: `make test-mediapipe`)
segments the dataset's images with nothing but the file and its metadata, and its category
masks agree with `segflow predict` on the same files on at least 99% of pixels.

The images are at the model size: larger ones MediaPipe resizes whole, while `segflow
predict` tiles them at full resolution, so their masks differ by design, not by export."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segflow.components.exporter import core as exporter
from segflow.config.experiment import validate_config
from segflow.utils.io import decode_mask, read_image
from segflow.utils.registry import EXPORT_FORMATS
from segflow.export.serving import SERVING_SUBDIR, ServingSpec
from tests.conftest import tiny_raw_config, train_cores

pytestmark = pytest.mark.mediapipe

ROOT = Path(__file__).resolve().parents[2]
MEDIAPIPE_PYTHON = ROOT / ".venv-mediapipe" / "bin" / "python"
RUNNER = Path(__file__).resolve().parent / "mediapipe_segment.py"
FORMATS = ["tflite_fp32", "tflite_int8"]
MIN_AGREEMENT = 0.99


@pytest.fixture(scope="module", params=[3, 1], ids=["rgb", "grey"])
def mediapipe_exports(request: pytest.FixtureRequest, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """The session's colour model, and a grey one (its TFLite input is colour: MediaPipe's
    ImageSegmenter takes 3-channel models only), trained, exported and re-evaluated."""
    if not MEDIAPIPE_PYTHON.exists():
        pytest.skip(f"{MEDIAPIPE_PYTHON} is absent: `make test-mediapipe` creates the MediaPipe environment and runs this test")
    if request.param == 3:
        trained = request.getfixturevalue("trained")
    else:
        grey = tiny_raw_config(tiny_data, shape=[32, 32, 1], stages=[{"epochs": 6, "learning_rate": 0.01}])
        trained = train_cores(validate_config(grey), tmp_path_factory.mktemp("grey"))
    config = trained["config"]
    config = config.model_copy(update={"export": config.export.model_copy(update={"formats": FORMATS, "calibration_examples": 8})})
    out = tmp_path_factory.mktemp("mediapipe") / "exports"
    results = exporter.run(config, trained["examples"], trained["model"], out)
    assert [results[name]["status"] for name in FORMATS] == ["passed", "passed"], results
    return trained, out


def _grey_copies(source: Path, target: Path) -> Path:
    """The images as grey PNGs, what a 1-channel model is for: MediaPipe's runner expands
    them to R = G = B and the model's luma gives the grey back, while `segflow predict` reads
    the grey itself. On colour images the two inputs differ by the rounding of the grey (one
    level), which flips a small model's near-ties in int8 (98.7-99.3% agreement, by training luck)."""
    from PIL import Image

    target.mkdir(parents=True)
    for image in source.glob("*.png"):
        Image.open(image).convert("L").save(target / image.name)
    return target


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.parametrize("name", FORMATS)
def test_mediapipe_image_segmenter_agrees_with_segflow_predict(name: str, mediapipe_exports: tuple[dict, Path], tiny_data: Path, tmp_path: Path) -> None:
    trained, exports = mediapipe_exports
    model = exports / EXPORT_FORMATS.get(name).file_name
    serving = Path(trained["model"]) / SERVING_SUBDIR
    spec = ServingSpec.load(serving)
    folder = tiny_data / "images" if spec.shape[2] == 3 else _grey_copies(tiny_data / "images", tmp_path / "grey-images")
    images = sorted(folder.glob("*.png"))
    assert images and all(read_image(image).shape[:2] == spec.shape[:2] for image in images)
    report = json.loads(_run([str(MEDIAPIPE_PYTHON), str(RUNNER), str(model), str(tmp_path / "mediapipe"), *map(str, images)]).splitlines()[-1])
    assert report["labels"] == list(spec.class_names)  # read from the model's metadata
    _run([str(Path(sys.executable).with_name("segflow")), "predict", str(model), str(folder), "-o", str(tmp_path / "segflow")])  # spec: the sidecar
    agree = total = 0
    for image in images:
        theirs = np.load(report["masks"][str(image)])
        ours = decode_mask((tmp_path / "segflow" / f"{image.stem}.png").read_bytes())
        assert theirs.shape == ours.shape == spec.shape[:2]
        agree, total = agree + int((theirs == ours).sum()), total + ours.size
    print(f"{name} ({spec.shape[2]}-channel model): MediaPipe ImageSegmenter and segflow predict agree on {agree / total:.4%} of {total} pixels ({len(images)} images)")
    assert agree / total >= MIN_AGREEMENT
