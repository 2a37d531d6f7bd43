"""Static checks of the container image definition (no Docker engine here): hadolint, and
the image name the KFP components reference."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from segflow.kfp_base import BASE_IMAGE

DOCKERFILE = Path(__file__).resolve().parents[1] / "containers" / "Dockerfile"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' provides it)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_the_image_components_reference() -> None:
    text = DOCKERFILE.read_text()
    assert f"-t {BASE_IMAGE} " in text
    assert "-c constraints.txt" in text  # the pinned stack, as in `make install`
