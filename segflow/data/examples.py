"""The Examples artifact: TFX-compatible `Split-<name>/` folders of GZIP TFRecord shards.

Each tf.train.Example holds one image (lossless PNG, original bit depth and channels),
its mask as a PNG of class ids, and the facts a later step needs without decoding.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from segflow.utils.io import read_json, write_json

SPLITS = ("train", "eval")  # the hash split's splits: every run without folds has both
ALL_SPLITS = ("train", "eval", "test")  # test only when the dataset names test folders; no eval with folds
SHARD_PATTERN = "data-*.tfrecord.gz"
FINGERPRINT_FILE = "fingerprint.json"
FOLD_FEATURE = "fold"


def split_dir(examples_dir: str | os.PathLike[str], split: str) -> Path:
    return Path(examples_dir) / f"Split-{split}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def group_key(stem: str, group_by: str | None) -> str:
    """The group a file stem belongs to: the first match of `group_by` (its group 1 if the
    pattern has a capture group); without a pattern or a match, the stem is its own group."""
    match = re.search(group_by, stem) if group_by else None
    if match is None:
        return stem
    return match.group(1) if match.re.groups else match.group(0)


def _groups(stems: list[str], group_by: str | None) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for stem in stems:
        groups.setdefault(group_key(stem, group_by), []).append(stem)
    return groups


def _bucket(key: str) -> int:
    """A group's fixed place among 2**64, from the sha256 of its key alone."""
    return int(_digest(key)[:16], 16)


def assign_splits(stems: list[str], eval_split: float, group_by: str | None = None, stable: bool = False) -> dict[str, str]:
    """The one place a split is decided: stem -> 'train' | 'eval'.

    `stable` (dataset.assignment: stable): a group is in eval when its bucket (`_bucket`) falls
    in the first `eval_split` of the 2**64 buckets, so a file keeps its split whatever files
    are added or removed, and the eval share is exact only on average.

    Otherwise (exact): groups (see `group_key`; without `group_by` every stem is its own group) are ranked by
    the sha256 of their key and walked in that order; a group goes to eval when it brings the
    eval count closer to round(n * eval_split), kept within 1..n-1. Without `group_by` that
    makes the eval share exact. Each split gets at least one group: if the walk leaves a split
    empty, the smallest group (first in hash order) moves there. Stable across runs and machines.
    """
    n = len(stems)
    if n < 2:
        raise ValueError(f"cannot split {n} example(s) into train and eval (eval_split {eval_split}): at least 2 are needed")
    groups = _groups(stems, group_by)
    if len(groups) < 2:
        raise ValueError(f"dataset.group_by {group_by!r} puts all {n} examples in one group {next(iter(groups))!r}: train and eval need 2 groups at least")
    if stable:
        return _stable_splits(groups, eval_split)
    target = min(max(round(n * eval_split), 1), n - 1)
    order = sorted(groups, key=_digest)
    chosen: list[str] = []
    count = 0
    for key in order:
        if abs(count + len(groups[key]) - target) < abs(count - target):
            chosen.append(key)
            count += len(groups[key])
    if not chosen:
        chosen = [min(order, key=lambda key: len(groups[key]))]
    elif len(chosen) == len(order):
        chosen.remove(min(chosen, key=lambda key: len(groups[key])))
    eval_keys = set(chosen)
    return {stem: "eval" if key in eval_keys else "train" for key, members in groups.items() for stem in members}


def _stable_splits(groups: dict[str, list[str]], eval_split: float) -> dict[str, str]:
    threshold = int(eval_split * 2**64)
    splits = {stem: "eval" if _bucket(key) < threshold else "train" for key, members in groups.items() for stem in members}
    for split in SPLITS:
        if split not in splits.values():
            raise ValueError(
                f"dataset.assignment stable put all {len(groups)} group(s) in {'eval' if split == 'train' else 'train'} (eval_split {eval_split}): "
                "too few files for a split by hash alone; use dataset.assignment: exact for a dataset this small"
            )
    return splits


def assign_folds(stems: list[str], folds: int, group_by: str | None = None, stable: bool = False) -> dict[str, int]:
    """stem -> fold id in 0..folds-1. `stable`: a group's fold is its bucket modulo `folds`, so
    adding or removing files never moves another file's fold (fold sizes equal only on average).
    Otherwise groups are ranked by the sha256 of their key (so a
    file's fold depends on its name, not on the experiment) and each goes, largest first,
    to the fold with the fewest examples so far (lowest id on ties): the folds differ in
    size by at most the largest group. Every fold gets at least one group."""
    groups = _groups(stems, group_by)
    if len(groups) < folds:
        raise ValueError(f"cannot split {len(stems)} example(s) in {len(groups)} group(s) into {folds} folds: every fold needs a group")
    if stable:
        by_bucket = {stem: _bucket(key) % folds for key, members in groups.items() for stem in members}
        empty = sorted(set(range(folds)) - set(by_bucket.values()))
        if empty:
            raise ValueError(f"dataset.assignment stable left fold(s) {empty} of {folds} empty with {len(groups)} group(s); use dataset.assignment: exact for a dataset this small")
        return by_bucket
    sizes = [0] * folds
    assigned: dict[str, int] = {}
    for key in sorted(groups, key=lambda key: (-len(groups[key]), _digest(key))):
        fold = min(range(folds), key=lambda index: (sizes[index], index))
        sizes[fold] += len(groups[key])
        assigned.update({stem: fold for stem in groups[key]})
    return assigned


def present_splits(examples_dir: str | os.PathLike[str]) -> list[str]:
    """The splits an Examples artifact holds, in ALL_SPLITS order."""
    return [split for split in ALL_SPLITS if split_dir(examples_dir, split).is_dir()]


def shard_name(index: int, count: int) -> str:
    """File name of shard `index` of `count` in a split folder (matches SHARD_PATTERN)."""
    return f"data-{index:05d}-of-{count:05d}.tfrecord.gz"


def write_shard(path: str | os.PathLike[str], records: Iterable[bytes]) -> None:
    """One GZIP TFRecord shard, written in the order given (its bytes depend only on the records)."""
    import tensorflow as tf

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    partial = f"{os.fspath(path)}.partial"
    with tf.io.TFRecordWriter(partial, options="GZIP") as writer:
        for record in records:
            writer.write(record)
    os.replace(partial, path)


def count_records(path: str | os.PathLike[str]) -> int:
    import tensorflow as tf

    return sum(1 for _ in tf.data.TFRecordDataset(os.fspath(path), compression_type="GZIP"))


def write_fingerprint(examples_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """`fingerprint.json`: the sha256 of every shard by relative path, and one digest over them all."""
    root = Path(examples_dir)
    shards = {
        Path(file).relative_to(root).as_posix(): hashlib.sha256(Path(file).read_bytes()).hexdigest()
        for split in present_splits(root)
        for file in split_files(root, split)
    }
    fingerprint = {"sha256": _digest(json.dumps(shards, sort_keys=True)), "shards": shards}
    write_json(root / FINGERPRINT_FILE, fingerprint)
    return fingerprint


def read_fingerprint(examples_dir: str | os.PathLike[str]) -> dict[str, Any]:
    return read_json(Path(examples_dir) / FINGERPRINT_FILE)


@dataclass(frozen=True)
class SegmentationExample:
    filename: str
    image: np.ndarray  # HxWxC uint8/uint16, RGB order
    mask: np.ndarray  # HxW uint8 class ids (ignore_index allowed)
    fold: int | None = None  # k-fold runs: the example's fold id

    @property
    def bit_depth(self) -> int:
        return 16 if self.image.dtype == np.uint16 else 8


def serialize(example: SegmentationExample) -> bytes:
    import tensorflow as tf

    from segflow.utils.io import encode_png

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
    if example.fold is not None:
        features[FOLD_FEATURE] = number(example.fold)
    # `feature` is a proto map: without `deterministic` its order follows the process's string
    # hash seed, so the same example would serialize differently in every run.
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


def deserialize(record: bytes) -> SegmentationExample:
    import tensorflow as tf

    from segflow.utils.io import decode_image

    feature = tf.train.Example.FromString(record).features.feature
    filename = feature["filename"].bytes_list.value[0].decode()
    image = decode_image(feature["image"].bytes_list.value[0], filename)
    mask = decode_image(feature["mask"].bytes_list.value[0], filename)[:, :, 0]
    fold = feature[FOLD_FEATURE].int64_list.value[0] if FOLD_FEATURE in feature else None
    return SegmentationExample(filename=filename, image=image, mask=mask, fold=fold)


# Features of every example that are pixels or identify one image, not facts to slice by.
PIXEL_AND_ID_FEATURES = ("image", "mask", "filename", FOLD_FEATURE)


def scalar_features(record: bytes) -> dict[str, int | float | str]:
    """The single-valued features of a serialized example other than its pixels and file name:
    what `serialize` records (height, width, channels, bit_depth) and any metadata column a
    dataset adds. The evaluator slices by them."""
    import tensorflow as tf

    found: dict[str, int | float | str] = {}
    for name, feature in tf.train.Example.FromString(record).features.feature.items():
        kind = feature.WhichOneof("kind")
        values = getattr(feature, kind).value if kind else []
        if name in PIXEL_AND_ID_FEATURES or len(values) != 1:
            continue
        found[name] = values[0].decode(errors="replace") if kind == "bytes_list" else values[0]
    return found


def split_files(examples_dir: str | os.PathLike[str], split: str) -> list[str]:
    files = sorted(str(path) for path in split_dir(examples_dir, split).glob(SHARD_PATTERN))
    if not files:
        raise FileNotFoundError(f"{split_dir(examples_dir, split)}: no TFRecord shards")
    return files


def iter_split(examples_dir: str | os.PathLike[str], split: str) -> Iterator[SegmentationExample]:
    import tensorflow as tf

    for record in tf.data.TFRecordDataset(split_files(examples_dir, split), compression_type="GZIP"):
        yield deserialize(record.numpy())


def fold_counts(examples_dir: str | os.PathLike[str], folds: int) -> list[int]:
    """Examples per fold in the train split of a k-fold run (after quarantine)."""
    import tensorflow as tf

    counts = [0] * folds
    records = tf.data.TFRecordDataset(split_files(examples_dir, "train"), compression_type="GZIP")
    for fold in records.map(lambda record: tf.io.parse_single_example(record, {FOLD_FEATURE: tf.io.FixedLenFeature([], tf.int64)})[FOLD_FEATURE]):
        counts[int(fold)] += 1
    return counts


def pixel_scale(bit_depth: int) -> float:
    """The largest raw value of a bit depth, to map 8- and 16-bit images to the same range."""
    return 65535.0 if bit_depth == 16 else 255.0


COUNTS_FILE = "counts.json"


def read_counts(examples_dir: str | os.PathLike[str]) -> dict[str, int]:
    return read_json(Path(examples_dir) / COUNTS_FILE)


STATISTICS_FILE = "statistics.json"


def read_statistics(statistics_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """A StatisticsGen output folder's statistics, or a statistics.json file itself (an earlier
    run's, for `validation.baseline_statistics`)."""
    path = Path(statistics_dir)
    file = path / STATISTICS_FILE if path.is_dir() else path
    try:
        statistics = read_json(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: no such statistics file (expected a StatisticsGen output folder or its {STATISTICS_FILE})") from None
    except ValueError as error:
        raise ValueError(f"{file}: not a segflow statistics file ({error})") from None
    if not isinstance(statistics, dict) or not isinstance(statistics.get("train"), dict):
        raise ValueError(f"{file}: not a segflow statistics file (no train split)")
    return statistics


ANOMALIES_FILE = "anomalies.json"


QUARANTINE_FILE = "quarantine.jsonl"
