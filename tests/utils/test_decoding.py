"""Image decoding: every format, TIFF compression, bit depth and channel count decodes to the
written RGB(A) array; multi-page TIFFs are refused or expanded, never cut to their first page.

Test files are written by writers independent of segflow.utils.io: tifffile, Pillow, a few lines of
PNG below, and OpenCV only where tifffile cannot encode (LZW without imagecodecs), with the
channel order given explicitly."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from segflow.config.experiment import validate_config
from segflow.utils.io import ImageReadError, decode_image, decode_mask, decode_pages, read_image

RNG = np.random.default_rng(7)
BGR = {1: [0], 3: [2, 1, 0], 4: [2, 1, 0, 3]}  # OpenCV's order, for writing with OpenCV only


def _pixels(dtype: type, channels: int, shape: tuple[int, int] = (20, 36)) -> np.ndarray:
    return RNG.integers(0, np.iinfo(dtype).max, size=(*shape, channels), endpoint=True).astype(dtype)


def _tiff(image: np.ndarray, **options: object) -> bytes:
    channels = image.shape[2]
    extra = {"photometric": "rgb" if channels > 1 else "minisblack"}
    if channels == 4:
        extra["extrasamples"] = ["unassalpha"]
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image if channels > 1 else image[:, :, 0], **extra, **options)
    return buffer.getvalue()


def _can_encode(compression: str) -> bool:
    try:
        _tiff(np.zeros((16, 16, 1), np.uint8), compression=compression)
    except (KeyError, ValueError, ImportError):  # tifffile: "requires the 'imagecodecs' package"
        return False
    return True


OPENCV_TIFF_CODES = {"lzw": 5, "packbits": 32773}


def _tiff_by_any_writer(image: np.ndarray, compression: str) -> bytes:
    """tifffile, or OpenCV where tifffile needs imagecodecs to encode (LZW, PackBits)."""
    if _can_encode(compression):
        return _tiff(image, compression=compression)
    ok, buffer = cv2.imencode(".tif", image[:, :, BGR[image.shape[2]]], [cv2.IMWRITE_TIFF_COMPRESSION, OPENCV_TIFF_CODES[compression]])
    assert ok
    return buffer.tobytes()


def _png(image: np.ndarray) -> bytes:
    """A minimal PNG writer (grey, RGB, RGBA; 8 or 16 bit) that shares no code with segflow."""
    height, width, channels = image.shape
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = image.astype(">u2" if image.dtype == np.uint16 else np.uint8).reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, image.dtype.itemsize * 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


TIFF_OPTIONS = {
    "none": {},
    "zlib": {"compression": "zlib"},
    "deflate": {"compression": "deflate"},
    "lzma": {"compression": "lzma"},
    "zstd": {"compression": "zstd"},
    "tiled": {"tile": (16, 16)},
    "tiled-zlib": {"tile": (16, 16), "compression": "zlib"},
    "tiled-lzma": {"tile": (16, 16), "compression": "lzma"},
    "planar": {"planarconfig": "separate"},
}


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("variant", [*TIFF_OPTIONS, *OPENCV_TIFF_CODES])
def test_tiff_decodes_to_the_written_rgb_array(variant: str, dtype: type, channels: int) -> None:
    """LZMA and tiled TIFFs, which OpenCV cannot read, used to come back with red and blue swapped."""
    image = _pixels(dtype, channels)
    if variant in OPENCV_TIFF_CODES:
        data = _tiff_by_any_writer(image, variant)
    else:
        options = dict(TIFF_OPTIONS[variant])
        if "compression" in options and not _can_encode(str(options["compression"])):
            pytest.skip(f"tifffile cannot write {options['compression']} here (needs imagecodecs)")
        if variant == "planar":
            if channels == 1:
                pytest.skip("planar configuration concerns several samples")
            image_first = np.moveaxis(image, -1, 0)
            buffer = io.BytesIO()
            tifffile.imwrite(buffer, image_first, photometric="rgb", extrasamples=["unassalpha"] if channels == 4 else None, **options)
            data = buffer.getvalue()
        else:
            data = _tiff(image, **options)
    decoded = decode_image(data, f"{variant}.tif")
    assert decoded.dtype == dtype
    np.testing.assert_array_equal(decoded, image)


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_decodes_to_the_written_rgb_array(dtype: type, channels: int) -> None:
    image = _pixels(dtype, channels)
    np.testing.assert_array_equal(decode_image(_png(image), "a.png"), image)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_bmp_decodes_to_the_written_rgb_array(mode: str) -> None:
    image = _pixels(np.uint8, 1 if mode == "L" else 3)
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if mode == "L" else image, mode).save(buffer, format="BMP")
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), "a.bmp"), image)


@pytest.mark.parametrize("container", ["JPEG", "TIFF"])
def test_jpeg_colours_within_tolerance(container: str) -> None:
    """JPEG is lossy: a smooth image whose red and blue differ a lot, compared with a tolerance
    that a swap of red and blue exceeds by far. JPEG-in-TIFF is written by Pillow's libtiff."""
    ramp = np.linspace(0, 40, 32)[None, :]
    image = np.empty((24, 32, 3), np.uint8)
    image[:, :, 0] = 200 + ramp / 2
    image[:, :, 1] = 100 + ramp
    image[:, :, 2] = 20 + ramp
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format=container, quality=95, **({"compression": "tiff_jpeg"} if container == "TIFF" else {}))
    decoded = decode_image(buffer.getvalue(), "a.jpg")
    assert decoded.shape == image.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - image).max() <= 8


def test_multi_page_tiff_is_refused_unless_expanded() -> None:
    pages = _pixels(np.uint16, 3, (5, 8, 12))  # five 8x12 RGB pages
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        for page in pages:
            writer.write(page, photometric="rgb", compression="zlib")
    data = buffer.getvalue()
    for decode in (decode_image, decode_mask):
        with pytest.raises(ImageReadError, match=r"stack.tif: multi-page TIFF \(5 pages\); set dataset.multipage: expand to use every page"):
            decode(data, "stack.tif")
    expanded = decode_pages(data, "stack.tif")
    assert len(expanded) == 5
    for decoded, page in zip(expanded, pages):
        np.testing.assert_array_equal(decoded, page)


def test_series_of_one_page_each_is_multi_page_too() -> None:
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        writer.write(np.zeros((4, 4), np.uint8))
        writer.write(np.ones((6, 6, 3), np.uint8), photometric="rgb")  # a second series of another shape
    with pytest.raises(ImageReadError, match=r"multi-page TIFF \(2 pages\)"):
        decode_image(buffer.getvalue(), "two.tif")
    assert [page.shape for page in decode_pages(buffer.getvalue(), "two.tif")] == [(4, 4, 1), (6, 6, 3)]


def test_thumbnail_is_not_a_page() -> None:
    image = _pixels(np.uint8, 3)
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        writer.write(image, photometric="rgb")
        writer.write(image[::4, ::4], photometric="rgb", subfiletype=1)  # reduced-resolution image
    np.testing.assert_array_equal(decode_image(buffer.getvalue()), image)


def test_multi_page_lzw_tiff_expands_through_opencv() -> None:
    """A codec that tifffile lacks (LZW without imagecodecs) still gives every page, in RGB order."""
    pages = [_pixels(np.uint8, 3, (6, 9)) for _ in range(3)]
    ok, buffer = cv2.imencodemulti(".tif", [page[:, :, ::-1] for page in pages], [cv2.IMWRITE_TIFF_COMPRESSION, 5])
    assert ok
    expanded = decode_pages(buffer.tobytes(), "lzw.tif")
    assert len(expanded) == 3
    for decoded, page in zip(expanded, pages):
        np.testing.assert_array_equal(decoded, page)


def test_codec_that_no_decoder_has_is_a_clear_error() -> None:
    """ZSTD TIFF (Pillow's libtiff writes it): neither tifffile without imagecodecs nor OpenCV reads it."""
    if _can_encode("zstd"):
        pytest.skip("this environment decodes zstd TIFFs")
    buffer = io.BytesIO()
    try:
        Image.fromarray(_pixels(np.uint8, 3), "RGB").save(buffer, format="TIFF", compression="zstd")
    except (OSError, ValueError):
        pytest.skip("Pillow's libtiff cannot write zstd here")
    with pytest.raises(ImageReadError, match=r"z.tif: cannot decode TIFF .*imagecodecs"):
        decode_image(buffer.getvalue(), "z.tif")


def test_palette_and_bilevel_tiffs() -> None:
    """An image shows its palette colours and MinIsWhite as displayed; a mask keeps stored labels."""
    indices = np.array([[0, 1], [2, 1]], np.uint8)
    colormap = np.zeros((3, 256), np.uint16)
    colormap[0, 1] = 255 * 257
    colormap[1, 2] = 128 * 257
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, indices, photometric="palette", colormap=colormap)
    assert decode_image(buffer.getvalue()).tolist() == [[[0, 0, 0], [255, 0, 0]], [[0, 128, 0], [255, 0, 0]]]
    np.testing.assert_array_equal(decode_mask(buffer.getvalue()), indices)
    bits = np.array([[True, False], [False, False]])
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, bits, photometric="miniswhite")
    np.testing.assert_array_equal(decode_mask(buffer.getvalue()), bits.astype(np.uint8))
    np.testing.assert_array_equal(decode_image(buffer.getvalue())[:, :, 0], np.where(bits, 0, 255))


def test_broken_tiff_and_unsupported_pixel_types_are_named(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="broken.tif: corrupt TIFF"):
        decode_image(b"II*\x00" + b"\x00" * 20, "broken.tif")
    (tmp_path / "float.tif").write_bytes(_tiff(np.zeros((4, 4, 1), np.float32)))
    with pytest.raises(ImageReadError, match="float.tif: unsupported pixel type float32"):
        read_image(tmp_path / "float.tif")
    with pytest.raises(ImageReadError, match="nope.png: cannot read"):
        read_image(tmp_path / "nope.png")


def _stack(path: Path, pages: np.ndarray) -> None:
    with tifffile.TiffWriter(path) as writer:
        for page in pages:
            writer.write(page)


def test_example_gen_expands_pages_and_checks_page_counts(tmp_path: Path) -> None:
    from segflow.components.example_gen.core import process_pair
    from segflow.data.sources import label_lookup
    from segflow.data.examples import deserialize

    images = RNG.integers(0, 255, (3, 8, 8), endpoint=True).astype(np.uint8)
    masks = RNG.integers(0, 2, (3, 8, 8), endpoint=True).astype(np.uint8)
    _stack(tmp_path / "a.tif", images)
    _stack(tmp_path / "a_mask.tif", masks)
    _stack(tmp_path / "b_mask.tif", masks[:2])

    def config(multipage: str):  # noqa: ANN202
        return validate_config(
            {"name": "pages", "dataset": {"images": str(tmp_path), "masks": str(tmp_path), "multipage": multipage}, "classes": 3, "shape": [16, 16, 1]}
        )

    expand = config("expand")
    table = label_lookup(expand.num_labels, expand.mask_values, expand.ignore_index)
    results = process_pair(("a", str(tmp_path / "a.tif"), str(tmp_path / "a_mask.tif")), expand, table)
    assert isinstance(results, list) and [kind for kind, _ in results] == ["example"] * 3
    examples = [deserialize(record) for _, record in results]
    assert [example.filename for example in examples] == ["a.tif#page1", "a.tif#page2", "a.tif#page3"]
    for example, image, mask in zip(examples, images, masks):
        np.testing.assert_array_equal(example.image[:, :, 0], image)
        np.testing.assert_array_equal(example.mask, mask)
    [(kind, entry)] = process_pair(("a", str(tmp_path / "a.tif"), str(tmp_path / "b_mask.tif")), expand, table)
    assert kind == "quarantine" and entry["reason"] == f"image has 3 pages but mask {tmp_path / 'b_mask.tif'} has 2"
    [(kind, entry)] = process_pair(("a", str(tmp_path / "a.tif"), str(tmp_path / "a_mask.tif")), config("quarantine"), table)
    assert kind == "quarantine" and entry == {"file": str(tmp_path / "a.tif"), "reason": "multi-page TIFF (3 pages); set dataset.multipage: expand to use every page"}
