"""Image decoding and crash-safe artifact writing.

Every artifact is written to a temporary sibling and renamed into place, so a crash
never leaves a half-written folder that a later step could mistake for a result.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
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


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders


class ImageReadError(ValueError):
    """A file that is not a decodable image."""


# One path per format, each returning RGB(A) order: PNG, JPEG and BMP are decoded by OpenCV
# (BGR, swapped once in _opencv_decode); TIFF by tifffile (already RGB), which also counts the
# pages. Only a TIFF codec that tifffile lacks without the imagecodecs package (LZW, JPEG) is
# left to OpenCV's libtiff, through the same swap.


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode PNG/JPEG/TIFF/BMP bytes to HxWxC (RGB order) keeping the bit depth (uint8 or uint16).
    A multi-page TIFF is an error rather than its first page: see decode_pages."""
    return _as_image(_decode(data, name, labels=False, all_pages=False)[0], name)


def decode_pages(data: bytes, name: str = "<bytes>") -> list[np.ndarray]:
    """Every page of a multi-page TIFF (thumbnails and pyramid levels are not pages), each as
    decode_image returns it; one page for every other file."""
    return [_as_image(page, name) for page in _decode(data, name, labels=False, all_pages=True)]


def decode_mask(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode a label mask to HxW. Stored values are labels: palette PNGs and TIFFs keep their
    palette indices (OpenCV would expand them to colours), a bilevel TIFF gives 0/1; a colour
    mask is accepted only when its channels are equal."""
    return _as_labels(_decode(data, name, labels=True, all_pages=False)[0], name)


def decode_mask_pages(data: bytes, name: str = "<bytes>") -> list[np.ndarray]:
    """decode_mask for every page of a multi-page TIFF (see decode_pages)."""
    return [_as_labels(page, name) for page in _decode(data, name, labels=True, all_pages=True)]


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ImageReadError(f"{path}: cannot read ({error.strerror})") from None
    return decode_image(data, str(path))


def _decode(data: bytes, name: str, labels: bool, all_pages: bool) -> list[np.ndarray]:
    if data[:4] in TIFF_SIGNATURES:
        return _tiff_pages(data, name, labels, all_pages)
    if labels and data[:8] == PNG_SIGNATURE:
        indices = _png_palette_indices(data, name)
        if indices is not None:
            return [indices]
    return [_opencv_decode(data, name)]


def _as_image(image: np.ndarray, name: str) -> np.ndarray:
    if image.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(f"{name}: unsupported pixel type {image.dtype}; expected 8- or 16-bit")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ImageReadError(f"{name}: unsupported shape {image.shape}; expected 1, 3 or 4 channels")
    return np.ascontiguousarray(image)


def _as_labels(image: np.ndarray, name: str) -> np.ndarray:
    mask = _as_image(image, name)
    if mask.shape[2] > 1:
        colour = mask[:, :, :3]
        if not (np.array_equal(colour[:, :, 0], colour[:, :, 1]) and np.array_equal(colour[:, :, 0], colour[:, :, 2])):
            raise ImageReadError(f"{name}: colour-coded mask (channels differ); expected one channel of label values")
    return np.ascontiguousarray(mask[:, :, 0])


def _swap_red_blue(image: np.ndarray) -> np.ndarray:
    """RGB(A) <-> BGR(A), OpenCV's order; grey is returned as it is."""
    if image.ndim == 3 and image.shape[2] == 3:
        return image[:, :, ::-1]
    if image.ndim == 3 and image.shape[2] == 4:
        return image[:, :, [2, 1, 0, 3]]
    return image


def _opencv_decode(data: bytes, name: str) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if image is None:
        raise ImageReadError(f"{name}: not a decodable image (corrupt or unsupported format)")
    return _swap_red_blue(image)


def _png_palette_indices(data: bytes, name: str) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as picture:
            return np.asarray(picture, np.uint8) if picture.mode == "P" else None
    except Exception:  # Pillow raises many types for a broken file
        raise ImageReadError(f"{name}: not a decodable image (corrupt PNG)") from None


def _tiff_pages(data: bytes, name: str, labels: bool, all_pages: bool) -> list[np.ndarray]:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            ifds = list(tiff.pages)
            pages = [page for page in ifds if not (page.is_reduced or page.is_mask)]
            if not pages:
                raise ImageReadError(f"{name}: corrupt TIFF (no image in it)")
            if len(pages) > 1 and not all_pages:
                raise ImageReadError(f"{name}: multi-page TIFF ({len(pages)} pages); set dataset.multipage: expand to use every page")
            decoded, by_opencv = [], None
            for page in pages:
                try:
                    decoded.append(_tiff_page(page, labels))
                except Exception as error:  # a codec tifffile lacks (its error says so) or a damaged page
                    if by_opencv is None:
                        by_opencv = _opencv_tiff_pages(data, name, len(ifds), error)
                    decoded.append(by_opencv[page.index])
            return decoded
    except ImageReadError:
        raise
    except Exception as error:  # tifffile raises many types for a broken file
        raise ImageReadError(f"{name}: corrupt TIFF ({error})") from None


def _tiff_page(page: Any, labels: bool) -> np.ndarray:
    """One page in RGB order and display values; for labels, the stored values."""
    image = page.asarray()
    if page.axes.startswith("S"):  # planar configuration "separate": samples first
        image = np.moveaxis(image, 0, -1)
    if labels:
        return image.astype(np.uint8) if image.dtype == bool else image
    if page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
        colour = np.moveaxis(page.colormap[:, image], 0, -1)
        # TIFF colour maps are 16-bit; a few writers store 8-bit values (libtiff's test too)
        image = (colour >> 8 if colour.max() > 255 else colour).astype(np.uint8)
    elif page.photometric == tifffile.PHOTOMETRIC.MINISWHITE:
        image = ~image if image.dtype == bool else (1 << page.bitspersample) - 1 - image
    return image.astype(np.uint8) * 255 if image.dtype == bool else image


def _opencv_tiff_pages(data: bytes, name: str, count: int, error: Exception) -> list[np.ndarray]:
    ok, pages = cv2.imdecodemulti(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if not ok or len(pages) != count:
        raise ImageReadError(f"{name}: cannot decode TIFF ({error}); the imagecodecs package adds TIFF codecs") from None
    return [_swap_red_blue(page) for page in pages]


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG of an HxWxC uint8/uint16 array in RGB(A) order."""
    ok, buffer = cv2.imencode(".png", _swap_red_blue(image))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()


_RENAME_EXCHANGE = 2  # renameat2 flag (linux/fs.h): swap two paths in one atomic step
_AT_FDCWD = -100


def exchange_paths(first: Path, second: Path) -> None:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). Raises OSError
    where the kernel or file system cannot do it."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available in this C library")
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"cannot exchange {first} and {second}: {os.strerror(number)}")


def commit_dir(fresh: Path, target: Path) -> None:
    """Publish the finished folder `fresh` as `target`, never deleting `target` first: either
    one rename (no previous version), or an atomic exchange with the previous version, which
    is deleted only once the new one is in place. Readers see the old or the new, never none."""
    fresh.chmod(0o755)
    try:
        os.rename(fresh, target)  # fails if target is a non-empty folder
        return
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
            raise
    exchange_paths(fresh, target)
    shutil.rmtree(fresh)  # now holds the previous version


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory that becomes `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield temporary
        commit_dir(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """UTF-8 text, written whole (a temporary sibling renamed into place: segflow.utils.storage)."""
    from segflow.utils.storage import write_bytes

    write_bytes(path, text.encode())


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
