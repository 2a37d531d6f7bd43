"""The Examples artifact: TFX-compatible `Split-<name>/` folders of GZIP TFRecord shards.

Each tf.train.Example holds one image (lossless PNG, original bit depth and channels),
its mask as a PNG of class ids, and the facts a later step needs without decoding.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

SPLITS = ("train", "eval")
SHARD_PATTERN = "data-*.tfrecord.gz"


def split_dir(examples_dir: str | os.PathLike[str], split: str) -> Path:
    return Path(examples_dir) / f"Split-{split}"


def assign_split(file_stem: str, eval_split: float) -> str:
    """Deterministic split by a hash of the file name: stable across runs and machines,
    and adding files never moves an existing file to the other split."""
    bucket = int.from_bytes(hashlib.sha256(file_stem.encode()).digest()[:8], "big") / 2**64
    return "eval" if bucket < eval_split else "train"


@dataclass(frozen=True)
class SegmentationExample:
    filename: str
    image: np.ndarray  # HxWxC uint8/uint16, RGB order
    mask: np.ndarray  # HxW uint8 class ids (ignore_index allowed)

    @property
    def bit_depth(self) -> int:
        return 16 if self.image.dtype == np.uint16 else 8


def serialize(example: SegmentationExample) -> bytes:
    import tensorflow as tf

    from segflow.io import encode_png

    height, width, channels = example.image.shape

    def raw(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def number(value: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    features = {
        "image": raw(encode_png(example.image)),
        "mask": raw(encode_png(example.mask.astype(np.uint8))),
        "height": number(height),
        "width": number(width),
        "channels": number(channels),
        "bit_depth": number(example.bit_depth),
        "filename": raw(example.filename.encode()),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def deserialize(record: bytes) -> SegmentationExample:
    import tensorflow as tf

    from segflow.io import decode_image

    feature = tf.train.Example.FromString(record).features.feature
    filename = feature["filename"].bytes_list.value[0].decode()
    image = decode_image(feature["image"].bytes_list.value[0], filename)
    mask = decode_image(feature["mask"].bytes_list.value[0], filename)[:, :, 0]
    return SegmentationExample(filename=filename, image=image, mask=mask)


def split_files(examples_dir: str | os.PathLike[str], split: str) -> list[str]:
    files = sorted(str(path) for path in split_dir(examples_dir, split).glob(SHARD_PATTERN))
    if not files:
        raise FileNotFoundError(f"{split_dir(examples_dir, split)}: no TFRecord shards")
    return files


def iter_split(examples_dir: str | os.PathLike[str], split: str) -> Iterator[SegmentationExample]:
    import tensorflow as tf

    for record in tf.data.TFRecordDataset(split_files(examples_dir, split), compression_type="GZIP"):
        yield deserialize(record.numpy())


def pixel_scale(bit_depth: int) -> float:
    """The largest raw value of a bit depth, to map 8- and 16-bit images to the same range."""
    return 65535.0 if bit_depth == 16 else 255.0
