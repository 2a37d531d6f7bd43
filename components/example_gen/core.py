"""ExampleGen: folders of images and masks -> Split-train/Split-eval TFRecords + quarantine.

Pairs images and masks by file stem, decides every pair's split once before Beam
(`segflow.examples.assign_splits`: exact eval share, optional `dataset.group_by`), decodes
and checks each pair in an Apache Beam pipeline (DirectRunner, one worker per core) and
writes GZIP TFRecord shards of tf.train.Example.

Reproducible: a split's shard count depends only on its size, a pair's shard on its stem's
rank, and each shard is written sorted by stem, so the shards are byte-identical on every
run; `fingerprint.json` holds their sha256 digests (`segflow.examples.read_fingerprint`).

Accounted for: every input file is either in a written example or in `quarantine.jsonl`
with its reason, and `examples_in = examples_written + quarantined` is checked on the
shards actually written (`AccountingError` otherwise). Entries of the image and mask folders
that are not inputs (hidden files, subfolders) are listed in `skipped.jsonl` with a reason and
`"skipped": true`, and counted as `skipped` in counts.json; they are not in `examples_in`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from segflow import storage
from segflow.config import ExperimentConfig
from segflow.examples import (
    SPLITS,
    SegmentationExample,
    assign_splits,
    count_records,
    group_key,
    serialize,
    shard_name,
    split_dir,
    split_files,
    write_fingerprint,
    write_shard,
)
from segflow.io import IMAGE_SUFFIXES, ImageReadError, atomic_dir, decode_image, decode_mask, decode_mask_pages, decode_pages, read_json, write_json
from segflow.runtime import beam_options, log

QUARANTINE_FILE = "quarantine.jsonl"
SKIPPED_FILE = "skipped.jsonl"
COUNTS_FILE = "counts.json"
BEAM_SCRATCH = ".beam"  # Beam's temporary files and side outputs, inside the artifact; removed before commit
QUARANTINE = "quarantine"
PAGES = "pages"
EXAMPLES_PER_SHARD = 128
MAX_SHARDS = 64


class NoUsableExamplesError(RuntimeError):
    """Every input was quarantined (or there was no input)."""


class AccountingError(RuntimeError):
    """examples_in != examples_written + quarantined: an example was lost or written twice."""


def _listing(folder: str | os.PathLike[str], skipped: list[dict[str, Any]]) -> dict[str, list[str]]:
    """File locations (paths or URIs) by stem; hidden entries and subfolders are appended to
    `skipped` with a reason."""
    try:
        entries = storage.list_folder(folder)
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: not a folder (check dataset.images / dataset.masks)") from None
    stems: dict[str, list[str]] = {}
    for entry in entries:
        if entry.name.startswith("."):
            reason = "hidden entry (name starts with '.')"
        elif entry.is_dir:
            reason = "not a file (subfolders are not read)"
        else:
            stems.setdefault(Path(entry.name).stem, []).append(entry.location)
            continue
        skipped.append({"file": entry.location, "reason": reason, "skipped": True})
    return stems


def _suffix(location: str) -> str:
    return Path(storage.basename(location)).suffix


def pair_files(
    images_dir: str | os.PathLike[str], masks_dir: str | os.PathLike[str]
) -> tuple[list[tuple[str, str, str]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(stem, image, mask) pairs, quarantine entries for files that cannot be paired, and the
    skipped entries (hidden files and subfolders: not examples)."""
    quarantined: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    images, masks = _listing(images_dir, skipped), _listing(masks_dir, skipped)
    pairs = []

    def usable(stem: str, paths: list[str], role: str) -> str | None:
        supported = [path for path in paths if _suffix(path).lower() in IMAGE_SUFFIXES]
        for path in paths:
            if _suffix(path).lower() not in IMAGE_SUFFIXES:
                quarantined.append({"file": str(path), "reason": f"unsupported file type {_suffix(path) or '(none)'!r}"})
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
    return pairs, quarantined, skipped


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


def process_pair(pair: tuple[str, str, str], config: ExperimentConfig, table: np.ndarray) -> list[tuple[str, Any]]:
    """[('example', serialized example)] or [('quarantine', entry)]. With `dataset.multipage:
    expand` a pair of multi-page TIFFs gives one of those per page, named `<file>#page<k>`
    (k from 1); image and mask must have the same page count."""
    stem, image_path, mask_path = pair
    expand = config.dataset.multipage == "expand"
    try:
        images = decode_pages(storage.read_bytes(image_path), image_path) if expand else [decode_image(storage.read_bytes(image_path), image_path)]
    except (ImageReadError, OSError) as error:
        return [("quarantine", {"file": image_path, "reason": str(error).removeprefix(f"{image_path}: ")})]
    try:
        masks = decode_mask_pages(storage.read_bytes(mask_path), mask_path) if expand else [decode_mask(storage.read_bytes(mask_path), mask_path)]
    except (ImageReadError, OSError) as error:
        return [("quarantine", {"file": mask_path, "reason": str(error).removeprefix(f"{mask_path}: ")})]
    if len(images) != len(masks):
        return [("quarantine", {"file": image_path, "reason": f"image has {len(images)} pages but mask {mask_path} has {len(masks)}"})]

    def one(image_path: str, mask_path: str, image: np.ndarray, raw_mask: np.ndarray) -> tuple[str, Any]:
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
        example = SegmentationExample(filename=storage.basename(image_path), image=image, mask=mapped.astype(np.uint8))
        return "example", serialize(example)

    if len(images) == 1:
        return [one(image_path, mask_path, images[0], masks[0])]
    return [one(f"{image_path}#page{k}", f"{mask_path}#page{k}", image, mask) for k, (image, mask) in enumerate(zip(images, masks), 1)]


class DecodeCheckSerialize:
    """Beam step: ((split, shard), pair) in; ((split, shard), ((stem, page), example bytes)) out,
    a quarantine entry on the QUARANTINE output, and on the PAGES output how many examples
    more than one the pair expanded into (multi-page TIFFs). The 64k-entry label table is
    built once per worker, not once per example."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.table: np.ndarray | None = None

    def __call__(self, item: tuple[tuple[str, int], tuple[str, str, str]]) -> Iterator[Any]:
        from apache_beam import pvalue

        if self.table is None:
            self.table = label_lookup(self.config)
        shard, pair = item
        results = process_pair(pair, self.config, self.table)
        if len(results) > 1:
            yield pvalue.TaggedOutput(PAGES, len(results) - 1)
        for page, (kind, value) in enumerate(results):
            yield pvalue.TaggedOutput(QUARANTINE, value) if kind == "quarantine" else (shard, ((pair[0], page), value))


def plan_shards(pairs: list[tuple[str, str, str]], splits: dict[str, str]) -> tuple[list[tuple[tuple[str, int], tuple[str, str, str]]], dict[str, int]]:
    """Each pair keyed by (split, shard): a split's stems in name order dealt round-robin over
    a shard count that depends only on the split's size. Returns the keyed pairs and the counts."""
    ranked = {split: sorted(stem for stem, name in splits.items() if name == split) for split in SPLITS}
    shard_counts = {split: max(1, min(MAX_SHARDS, math.ceil(len(stems) / EXAMPLES_PER_SHARD))) for split, stems in ranked.items()}
    rank = {stem: index for stems in ranked.values() for index, stem in enumerate(stems)}
    keyed = [((splits[pair[0]], rank[pair[0]] % shard_counts[splits[pair[0]]]), pair) for pair in pairs]
    return keyed, shard_counts


def write_split_shard(group: tuple[tuple[str, int], Iterable[tuple[tuple[str, int], bytes]]], examples_dir: str, shard_counts: dict[str, int]) -> None:
    """Beam step: one (split, shard) group, sorted by (stem, page), written as one shard."""
    (split, index), items = group
    write_shard(split_dir(examples_dir, split) / shard_name(index, shard_counts[split]), (record for _, record in sorted(items)))


def run(config: ExperimentConfig, examples_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Write the Examples artifact to `examples_dir`; return the counts for summary.json."""
    import apache_beam as beam

    pairs, unpaired, skipped = pair_files(config.dataset.images, config.dataset.masks)
    skipped = _sorted_entries(skipped)
    log(f"example_gen: {len(pairs)} image/mask pairs, {len(unpaired)} unpairable files, {len(skipped)} skipped entries")
    try:
        splits = assign_splits([stem for stem, _, _ in pairs], config.dataset.eval_split, config.dataset.group_by)
    except ValueError as error:
        raise NoUsableExamplesError(f"no usable examples to split in {config.dataset.images} / {config.dataset.masks}: {error}") from None
    _log_splits(splits, config)
    keyed, shard_counts = plan_shards(pairs, splits)
    with atomic_dir(examples_dir) as out:
        scratch = out / BEAM_SCRATCH  # inside the artifact, so that every worker of any runner can reach it
        with beam.Pipeline(options=beam_options(config.beam, scratch / "tmp")) as pipeline:
            processed = (
                pipeline
                | "Pairs" >> beam.Create(keyed, reshuffle=True)
                | "DecodeCheckSerialize" >> beam.FlatMap(DecodeCheckSerialize(config)).with_outputs(QUARANTINE, PAGES, main="examples")
            )
            (
                processed.examples
                | "ByShard" >> beam.GroupByKey()
                | "WriteShards" >> beam.Map(write_split_shard, examples_dir=str(out), shard_counts=shard_counts)
            )
            (
                processed[QUARANTINE]
                | "QuarantineJson" >> beam.Map(lambda entry: json.dumps(entry, sort_keys=True))
                | "WriteQuarantine" >> beam.io.WriteToText(str(scratch / QUARANTINE), shard_name_template="")
            )
            (
                processed[PAGES]
                | "ExtraPages" >> beam.CombineGlobally(sum)
                | "WritePages" >> beam.io.WriteToText(str(scratch / PAGES), shard_name_template="")
            )
        for split, count in shard_counts.items():  # a shard whose pairs were all quarantined is written empty
            for index in range(count):
                if not (split_dir(out, split) / shard_name(index, count)).exists():
                    write_shard(split_dir(out, split) / shard_name(index, count), [])
        entries = _sorted_entries(unpaired + [json.loads(line) for line in _lines(scratch / QUARANTINE)])
        written = {split: sum(count_records(file) for file in split_files(out, split)) for split in SPLITS}
        counts = {
            "examples_in": len(pairs) + len(unpaired) + sum(int(line) for line in _lines(scratch / PAGES)),
            "examples_written": sum(written.values()),
            "quarantined": len(entries),
            "skipped": len(skipped),
            **{f"{split}_examples": count for split, count in written.items()},
        }
        _check_accounting(counts)
        _check(counts, config, entries)
        shutil.rmtree(scratch)
        (out / QUARANTINE_FILE).write_text("".join(json.dumps(entry) + "\n" for entry in entries))
        (out / SKIPPED_FILE).write_text("".join(json.dumps(entry) + "\n" for entry in skipped))
        write_json(out / COUNTS_FILE, counts)
        fingerprint = write_fingerprint(out)
    for entry in skipped:
        log(f"example_gen: skipped {entry['file']}: {entry['reason']}")
    for entry in entries:
        log(f"example_gen: quarantined {entry['file']}: {entry['reason']}")
    log(
        f"example_gen: wrote {counts['train_examples']} train + {counts['eval_examples']} eval examples in "
        f"{shard_counts['train']} + {shard_counts['eval']} shards (sha256 {fingerprint['sha256'][:12]}), quarantined {counts['quarantined']}"
    )
    return counts


def _sorted_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(entries, key=lambda entry: (entry["file"], entry["reason"]))


def _log_splits(splits: dict[str, str], config: ExperimentConfig) -> None:
    message = ", ".join(f"{sum(1 for name in splits.values() if name == split)} {split}" for split in SPLITS)
    if config.dataset.group_by:
        for split in SPLITS:
            keys = sorted({group_key(stem, config.dataset.group_by) for stem, name in splits.items() if name == split})
            shown = ", ".join(keys[:10]) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")
            message += f"; {split}: {len(keys)} group(s) {shown}"
    log(f"example_gen: split {message} (eval_split {config.dataset.eval_split}, group_by {config.dataset.group_by!r})")


def _check_accounting(counts: dict[str, int]) -> None:
    """Every example that came in is either written or quarantined, exactly once."""
    if counts["examples_in"] != counts["examples_written"] + counts["quarantined"]:
        raise AccountingError(
            f"examples_in {counts['examples_in']} != examples_written {counts['examples_written']} + quarantined "
            f"{counts['quarantined']}: {counts['examples_in'] - counts['examples_written'] - counts['quarantined']} example(s) lost or duplicated"
        )


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _check(counts: dict[str, int], config: ExperimentConfig, entries: list[dict[str, Any]]) -> None:
    if counts["examples_written"] == 0:
        reasons = "; ".join(f"{storage.basename(e['file'])}: {e['reason']}" for e in entries[:5])
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


def read_counts(examples_dir: str | os.PathLike[str]) -> dict[str, int]:
    return read_json(Path(examples_dir) / COUNTS_FILE)
