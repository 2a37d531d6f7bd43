"""Image decoding and crash-safe artifact writing.

Every artifact is written to a temporary sibling and renamed into place, so a crash
never leaves a half-written folder that a later step could mistake for a result.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import tifffile

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class ImageReadError(ValueError):
    """A file that is not a decodable image."""


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode PNG/JPEG/TIFF/BMP bytes to HxWxC (RGB order) keeping the bit depth (uint8 or uint16)."""
    image = None
    if data:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None and data[:4] in (b"II*\x00", b"MM\x00*"):
        try:
            image = tifffile.imread(io.BytesIO(data))
        except Exception as error:  # tifffile raises many types for a broken file
            raise ImageReadError(f"{name}: corrupt TIFF ({error})") from None
    if image is None:
        raise ImageReadError(f"{name}: not a decodable image (corrupt or unsupported format)")
    if image.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(f"{name}: unsupported pixel type {image.dtype}; expected 8- or 16-bit")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ImageReadError(f"{name}: unsupported shape {image.shape}; expected 1, 3 or 4 channels")
    if image.shape[2] == 3:
        image = image[:, :, ::-1]
    elif image.shape[2] == 4:
        image = image[:, :, [2, 1, 0, 3]]
    return np.ascontiguousarray(image)


def decode_mask(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode a label mask to HxW. Palette PNGs keep their palette indices (OpenCV would
    expand them to colours); a colour mask is accepted only when its channels are equal."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as picture:
                if picture.mode == "P":
                    return np.asarray(picture, np.uint8)
        except Exception:  # Pillow raises many types for a broken file
            raise ImageReadError(f"{name}: not a decodable image (corrupt PNG)") from None
    mask = decode_image(data, name)
    if mask.shape[2] > 1:
        colour = mask[:, :, :3]
        if not (np.array_equal(colour[:, :, 0], colour[:, :, 1]) and np.array_equal(colour[:, :, 0], colour[:, :, 2])):
            raise ImageReadError(f"{name}: colour-coded mask (channels differ); expected one channel of label values")
    return mask[:, :, 0]


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ImageReadError(f"{path}: cannot read ({error.strerror})") from None
    return decode_image(data, str(path))


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG of an HxWxC uint8/uint16 array in RGB(A) order."""
    if image.ndim == 3 and image.shape[2] == 3:
        image = image[:, :, ::-1]
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, [2, 1, 0, 3]]
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()


def convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Adapt an HxWxC image to the model's channel count: alpha is dropped, grey is repeated,
    colour becomes luma (ITU-R 601)."""
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.shape[2] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=2)
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.round(luma)[:, :, None].astype(image.dtype)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory that replaces `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield temporary
        temporary.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | os.PathLike[str], value: Any) -> None:
    """Atomic, numpy-aware JSON; NaN becomes null so that strict readers accept it."""
    atomic_write_text(path, json.dumps(_jsonable(value), indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())
