"""ExampleGen: folders of images and masks -> Split-train/Split-eval TFRecords + quarantine.

Pairs images and masks by file stem, decodes and checks each pair in an Apache Beam
pipeline (DirectRunner, one worker per core) and writes GZIP TFRecord shards of
tf.train.Example. Nothing is lost: every input file is either in a written example
or in `quarantine.jsonl` with its reason.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from segflow.config import ExperimentConfig
from segflow.examples import SPLITS, SegmentationExample, assign_split, serialize, split_dir
from segflow.io import IMAGE_SUFFIXES, ImageReadError, atomic_dir, decode_image, decode_mask, read_json, write_json
from segflow.runtime import beam_options, log

QUARANTINE_FILE = "quarantine.jsonl"
COUNTS_FILE = "counts.json"


class NoUsableExamplesError(RuntimeError):
    """Every input was quarantined (or there was no input)."""


def _listing(folder: Path) -> dict[str, list[Path]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder (check dataset.images / dataset.masks)")
    stems: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            stems.setdefault(path.stem, []).append(path)
    return stems


def pair_files(images_dir: Path, masks_dir: Path) -> tuple[list[tuple[str, str, str]], list[dict[str, str]]]:
    """(stem, image, mask) pairs, and quarantine entries for files that cannot be paired."""
    images, masks = _listing(images_dir), _listing(masks_dir)
    pairs, quarantined = [], []

    def usable(stem: str, paths: list[Path], role: str) -> Path | None:
        supported = [path for path in paths if path.suffix.lower() in IMAGE_SUFFIXES]
        for path in paths:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                quarantined.append({"file": str(path), "reason": f"unsupported file type {path.suffix or '(none)'!r}"})
        if len(supported) > 1:
            for path in supported:
                quarantined.append({"file": str(path), "reason": f"several {role} files share the stem {stem!r}"})
            return None
        return supported[0] if supported else None

    for stem in sorted(set(images) | set(masks)):
        image = usable(stem, images.get(stem, []), "image")
        mask = usable(stem, masks.get(stem, []), "mask")
        if image and mask:
            pairs.append((stem, str(image), str(mask)))
        elif image and stem not in masks:
            quarantined.append({"file": str(image), "reason": f"no mask with stem {stem!r} in {masks_dir}"})
        elif mask and stem not in images:
            quarantined.append({"file": str(mask), "reason": f"no image with stem {stem!r} in {images_dir}"})
        elif image or mask:  # the partner exists but was quarantined above
            quarantined.append({"file": str(image or mask), "reason": f"its partner file for stem {stem!r} is unusable"})
    return pairs, quarantined


def label_lookup(config: ExperimentConfig) -> np.ndarray:
    """Raw mask value -> class id (uint8), 65536 entries; -1 marks values that are not allowed."""
    table = np.full(65536, -1, np.int32)
    if config.mask_values is None:
        table[: config.num_labels] = np.arange(config.num_labels)
    else:
        table[np.array(config.mask_values)] = np.arange(config.num_labels)
    if config.ignore_index is not None:
        table[config.ignore_index] = config.ignore_index
    return table


def process_pair(pair: tuple[str, str, str], config: ExperimentConfig, table: np.ndarray) -> tuple[str, Any]:
    """('train'|'eval', serialized example) or ('quarantine', entry)."""
    stem, image_path, mask_path = pair
    try:
        image = decode_image(Path(image_path).read_bytes(), image_path)
    except (ImageReadError, OSError) as error:
        return "quarantine", {"file": image_path, "reason": str(error).removeprefix(f"{image_path}: ")}
    try:
        raw_mask = decode_mask(Path(mask_path).read_bytes(), mask_path)
    except (ImageReadError, OSError) as error:
        return "quarantine", {"file": mask_path, "reason": str(error).removeprefix(f"{mask_path}: ")}
    if raw_mask.shape != image.shape[:2]:
        return "quarantine", {
            "file": image_path,
            "reason": f"image is {image.shape[1]}x{image.shape[0]} but mask {mask_path} is {raw_mask.shape[1]}x{raw_mask.shape[0]}",
        }
    mapped = table[raw_mask]
    if (mapped < 0).any():
        bad = np.unique(raw_mask[mapped < 0])
        allowed = config.mask_values if config.mask_values is not None else f"class ids 0..{config.num_labels - 1}"
        shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
        return "quarantine", {"file": mask_path, "reason": f"mask values {shown} not in {allowed} (ignore_index {config.ignore_index})"}
    example = SegmentationExample(filename=Path(image_path).name, image=image, mask=mapped.astype(np.uint8))
    return assign_split(stem, config.dataset.eval_split), serialize(example)


class DecodeCheckSerialize:
    """Beam step: one pair in, ('train'|'eval', example bytes) or ('quarantine', entry) out.
    The 64k-entry label table is built once per worker, not once per example."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.table: np.ndarray | None = None

    def __call__(self, pair: tuple[str, str, str]) -> tuple[str, Any]:
        if self.table is None:
            self.table = label_lookup(self.config)
        return process_pair(pair, self.config, self.table)


def run(config: ExperimentConfig, examples_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Write the Examples artifact to `examples_dir`; return the counts for summary.json."""
    import apache_beam as beam

    pairs, quarantined = pair_files(Path(config.dataset.images), Path(config.dataset.masks))
    log(f"example_gen: {len(pairs)} image/mask pairs, {len(quarantined)} unpairable files")
    scratch = Path(tempfile.mkdtemp(prefix="segflow-beam-"))
    try:
        with atomic_dir(examples_dir) as out:
            options = beam_options(config.beam.running_mode, config.beam.num_workers, scratch)
            with beam.Pipeline(options=options) as pipeline:
                tagged = (
                    pipeline
                    | "Pairs" >> beam.Create(pairs, reshuffle=True)
                    | "DecodeCheckSerialize" >> beam.Map(DecodeCheckSerialize(config))
                )
                for split in SPLITS:
                    (
                        tagged
                        | f"Only{split}" >> beam.Filter(lambda item, name=split: item[0] == name)
                        | f"Bytes{split}" >> beam.Map(lambda item: item[1])
                        | f"Write{split}"
                        >> beam.io.WriteToTFRecord(
                            str(split_dir(out, split) / "data"),
                            file_name_suffix=".tfrecord.gz",
                            compression_type=beam.io.filesystem.CompressionTypes.GZIP,
                        )
                    )
                (
                    tagged
                    | "OnlyQuarantine" >> beam.Filter(lambda item: item[0] == "quarantine")
                    | "QuarantineJson" >> beam.Map(lambda item: json.dumps(item[1], sort_keys=True))
                    | "WriteQuarantine" >> beam.io.WriteToText(str(scratch / "quarantine"), shard_name_template="")
                )
                (
                    tagged
                    | "Keys" >> beam.Map(lambda item: item[0])
                    | "CountPerKey" >> beam.combiners.Count.PerElement()
                    | "CountsJson" >> beam.Map(json.dumps)
                    | "WriteCounts" >> beam.io.WriteToText(str(scratch / "counts"), shard_name_template="")
                )
            beam_quarantine = [json.loads(line) for line in _lines(scratch / "quarantine")]
            per_key = dict(json.loads(line) for line in _lines(scratch / "counts"))
            entries = sorted(quarantined + beam_quarantine, key=lambda entry: entry["file"])
            written = {split: per_key.get(split, 0) for split in SPLITS}
            counts = {
                "examples_in": len(pairs) + len(quarantined),
                "examples_written": sum(written.values()),
                "quarantined": len(entries),
                **{f"{split}_examples": count for split, count in written.items()},
            }
            _check(counts, config, out, entries)
            (out / QUARANTINE_FILE).write_text("".join(json.dumps(entry) + "\n" for entry in entries))
            write_json(out / COUNTS_FILE, counts)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for entry in entries:
        log(f"example_gen: quarantined {entry['file']}: {entry['reason']}")
    log(f"example_gen: wrote {counts['train_examples']} train + {counts['eval_examples']} eval examples, quarantined {counts['quarantined']}")
    return counts


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _check(counts: dict[str, int], config: ExperimentConfig, out: Path, entries: list[dict[str, str]]) -> None:
    if counts["examples_written"] == 0:
        reasons = "; ".join(f"{Path(e['file']).name}: {e['reason']}" for e in entries[:5])
        raise NoUsableExamplesError(
            f"no usable example in {config.dataset.images} / {config.dataset.masks} "
            f"({counts['examples_in']} inputs, all quarantined{': ' + reasons if reasons else ''})"
        )
    for split in SPLITS:
        if counts[f"{split}_examples"] == 0:
            raise NoUsableExamplesError(
                f"the {split} split is empty ({counts['examples_written']} usable examples, eval_split "
                f"{config.dataset.eval_split}); add data or change dataset.eval_split"
            )
        split_dir(out, split).mkdir(exist_ok=True)


def read_counts(examples_dir: str | os.PathLike[str]) -> dict[str, int]:
    return read_json(Path(examples_dir) / COUNTS_FILE)
