"""ExampleGen: folders of images and masks -> Split-train/Split-eval(/Split-test) TFRecords + quarantine.

Pairs images and masks by file stem, decides every pair's split once before Beam (`assign`:
the dataset's named eval/test folders, or `segflow.data.examples.assign_splits`: exact eval share or, with
`dataset.assignment: stable`, a split from each file's name alone,
optional `dataset.group_by`; with `dataset.folds` every train example carries its fold id
from `segflow.data.examples.assign_folds`, and there is no eval split), decodes
and checks each pair in an Apache Beam pipeline (DirectRunner, one worker per core) and
writes GZIP TFRecord shards of tf.train.Example.

Reproducible: a split's shard count depends only on its size, a pair's shard on its stem's
rank, and each shard is written sorted by stem, so the shards are byte-identical on every
run; `fingerprint.json` holds their sha256 digests (`segflow.data.examples.read_fingerprint`).

Accounted for: every input file is either in a written example or in `quarantine.jsonl`
with its reason, and `examples_in = examples_written + quarantined` is checked on the
shards actually written (`AccountingError` otherwise). Entries of the image and mask folders
that are not inputs (hidden files, subfolders) are listed in `skipped.jsonl` with a reason and
`"skipped": true`, and counted as `skipped` in counts.json; they are not in `examples_in`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from segflow.config.experiment import ExperimentConfig
from segflow.console import Progress
from segflow.data.examples import (
    COUNTS_FILE,
    FOLD_FEATURE,
    QUARANTINE_FILE,
    SegmentationExample,
    assign_folds,
    assign_splits,
    count_records,
    fold_counts,
    group_key,
    read_counts,
    serialize,
    shard_name,
    split_dir,
    split_files,
    write_fingerprint,
    write_shard,
)
from segflow.data.sources import label_lookup, pair_files
from segflow.utils import storage
from segflow.utils.io import (
    ImageReadError,
    atomic_dir,
    decode_image,
    decode_mask,
    decode_mask_pages,
    decode_pages,
    write_json,
)
from segflow.utils.runtime import beam_options, log

SKIPPED_FILE = "skipped.jsonl"
BEAM_SCRATCH = ".beam"  # Beam's temporary files and side outputs, inside the artifact; removed before commit
QUARANTINE = "quarantine"
PAGES = "pages"
EXAMPLES_PER_SHARD = 128
MAX_SHARDS = 64


class NoUsableExamplesError(RuntimeError):
    """Every input was quarantined (or there was no input)."""


class AccountingError(RuntimeError):
    """examples_in != examples_written + quarantined: an example was lost or written twice."""


def process_pair(pair: tuple[str, str, str], config: ExperimentConfig, table: np.ndarray, fold: int | None = None) -> list[tuple[str, Any]]:
    """[('example', serialized example)] or [('quarantine', entry)]; `fold`: the examples'
    fold id in a k-fold run. With `dataset.multipage:
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
        example = SegmentationExample(filename=storage.basename(image_path), image=image, mask=mapped.astype(np.uint8), fold=fold)
        return "example", serialize(example)

    if len(images) == 1:
        return [one(image_path, mask_path, images[0], masks[0])]
    return [one(f"{image_path}#page{k}", f"{mask_path}#page{k}", image, mask) for k, (image, mask) in enumerate(zip(images, masks), 1)]


DECODE_STEP = "example_gen: decode, check, serialize"  # the console's progress step


class DecodeCheckSerialize:
    """Beam step: ((split, shard), (pair, fold)) in; ((split, shard), ((stem, page), example
    bytes)) out, a quarantine entry on the QUARANTINE output, and on the PAGES output how
    many examples more than one the pair expanded into (multi-page TIFFs). The 64k-entry
    label table is built once per worker, not once per example."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.table: np.ndarray | None = None
        self.counter: Progress | None = None  # made on the worker, like the table

    def __call__(self, item: tuple[tuple[str, int], tuple[tuple[str, str, str], int | None]]) -> Iterator[Any]:
        from apache_beam import pvalue

        if self.table is None:
            self.table = label_lookup(self.config.num_labels, self.config.mask_values, self.config.ignore_index)
        if self.counter is None:
            self.counter = Progress(DECODE_STEP, unit="pairs")
        shard, (pair, fold) = item
        results = process_pair(pair, self.config, self.table, fold)
        self.counter.add()
        if len(results) > 1:
            yield pvalue.TaggedOutput(PAGES, len(results) - 1)
        for page, (kind, value) in enumerate(results):
            yield pvalue.TaggedOutput(QUARANTINE, value) if kind == "quarantine" else (shard, ((pair[0], page), value))


Assigned = list[tuple[str, tuple[str, str, str]]]  # (split, (stem, image, mask)) for every pair


def plan_shards(
    assigned: Assigned, folds: dict[str, int]
) -> tuple[list[tuple[tuple[str, int], tuple[tuple[str, str, str], int | None]]], dict[str, int]]:
    """Each pair keyed by (split, shard), with its fold (train split of a k-fold run): a
    split's stems in name order dealt round-robin over a shard count that depends only on
    the split's size. Returns the keyed pairs and the shard count of every split."""
    ranked: dict[str, list[str]] = {}
    for split, (stem, _, _) in assigned:
        ranked.setdefault(split, []).append(stem)
    shard_counts = {split: max(1, min(MAX_SHARDS, math.ceil(len(stems) / EXAMPLES_PER_SHARD))) for split, stems in ranked.items()}
    rank = {(split, stem): index for split, stems in ranked.items() for index, stem in enumerate(sorted(stems))}
    keyed = [
        ((split, rank[split, pair[0]] % shard_counts[split]), (pair, folds.get(pair[0]) if split == "train" else None)) for split, pair in assigned
    ]
    return keyed, shard_counts


def write_split_shard(group: tuple[tuple[str, int], Iterable[tuple[tuple[str, int], bytes]]], examples_dir: str, shard_counts: dict[str, int]) -> None:
    """Beam step: one (split, shard) group, sorted by (stem, page), written as one shard."""
    (split, index), items = group
    write_shard(split_dir(examples_dir, split) / shard_name(index, shard_counts[split]), (record for _, record in sorted(items)))


def assign(config: ExperimentConfig) -> tuple[Assigned, dict[str, int], list[dict[str, Any]], list[dict[str, Any]]]:
    """The one place every pair gets its split (and fold): named eval/test folders as given,
    else a hash split (or k folds) of dataset.images/masks. Returns the assigned pairs, the
    folds by stem (k-fold runs), and the unpairable and skipped entries of every folder."""
    pairs, unpaired, skipped = pair_files(config.dataset.images, config.dataset.masks)
    folds: dict[str, int] = {}
    named = {split: folders for split, folders in (("eval", config.dataset.eval), ("test", config.dataset.test)) if folders is not None}
    try:
        if config.dataset.folds is not None:
            folds = assign_folds([stem for stem, _, _ in pairs], config.dataset.folds, config.dataset.group_by, config.dataset.assignment == "stable")
            assigned: Assigned = [("train", pair) for pair in pairs]
        elif "eval" in named:
            assigned = [("train", pair) for pair in pairs]
        else:
            splits = assign_splits([stem for stem, _, _ in pairs], config.dataset.eval_share, config.dataset.group_by, config.dataset.assignment == "stable")
            assigned = [(splits[pair[0]], pair) for pair in pairs]
    except ValueError as error:
        raise NoUsableExamplesError(f"no usable examples to split in {config.dataset.images} / {config.dataset.masks}: {error}") from None
    for split, folders in named.items():
        split_pairs, split_unpaired, split_skipped = pair_files(folders.images, folders.masks)
        assigned += [(split, pair) for pair in split_pairs]
        unpaired += split_unpaired
        skipped += split_skipped
    return assigned, folds, unpaired, skipped


def run(config: ExperimentConfig, examples_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Write the Examples artifact to `examples_dir`; return the counts for summary.json."""
    assigned, folds, unpaired, skipped = assign(config)
    skipped = _sorted_entries(skipped)
    log(f"example_gen: {len(assigned)} image/mask pairs, {len(unpaired)} unpairable files, {len(skipped)} skipped entries")
    _log_splits(assigned, folds, config)
    keyed, shard_counts = plan_shards(assigned, folds)
    with atomic_dir(examples_dir) as out:
        scratch = out / BEAM_SCRATCH  # inside the artifact, so that every worker of any runner can reach it
        counter = Progress(DECODE_STEP, len(keyed), "pairs")  # the workers count; their last counts may come unreported
        _decode_and_write(config, keyed, shard_counts, out, scratch)
        counter.end(done=len(keyed))
        for split, count in shard_counts.items():  # a shard whose pairs were all quarantined is written empty
            for index in range(count):
                if not (split_dir(out, split) / shard_name(index, count)).exists():
                    write_shard(split_dir(out, split) / shard_name(index, count), [])
        entries = _sorted_entries(unpaired + [json.loads(line) for line in _lines(scratch / QUARANTINE)])
        written = {split: sum(count_records(file) for file in split_files(out, split)) for split in shard_counts}
        counts: dict[str, Any] = {
            "examples_in": len(assigned) + len(unpaired) + sum(int(line) for line in _lines(scratch / PAGES)),
            "examples_written": sum(written.values()),
            "quarantined": len(entries),
            "skipped": len(skipped),
            **{f"{split}_examples": count for split, count in written.items()},
        }
        if config.dataset.folds is not None:
            counts["fold_examples"] = fold_counts(out, config.dataset.folds)
        _check_accounting(counts)
        _check(counts, config, entries)
        shutil.rmtree(scratch)
        (out / QUARANTINE_FILE).write_text("".join(json.dumps(entry) + "\n" for entry in entries))
        (out / SKIPPED_FILE).write_text("".join(json.dumps(entry) + "\n" for entry in skipped))
        write_json(out / COUNTS_FILE, counts)
        fingerprint = write_fingerprint(out)
    _log_written(counts, shard_counts, skipped, entries, fingerprint["sha256"])
    return counts


def _decode_and_write(config: ExperimentConfig, keyed: list[Any], shard_counts: dict[str, int], out: Path, scratch: Path) -> None:
    """The Beam pipeline: decode, check and serialize every pair, write each split's shards,
    and leave the quarantine entries and the extra pages' count in `scratch`."""
    import apache_beam as beam

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


def _log_written(counts: dict[str, Any], shard_counts: dict[str, int], skipped: list[dict[str, Any]], entries: list[dict[str, Any]], sha256: str) -> None:
    for entry in skipped:
        log(f"example_gen: skipped {entry['file']}: {entry['reason']}")
    for entry in entries:
        log(f"example_gen: quarantined {entry['file']}: {entry['reason']}")
    written_splits = " + ".join(f"{counts[f'{split}_examples']} {split}" for split in shard_counts)
    shards = " + ".join(str(count) for count in shard_counts.values())
    by_fold = f" (folds {counts['fold_examples']})" if "fold_examples" in counts else ""
    log(f"example_gen: wrote {written_splits} examples{by_fold} in {shards} shards (sha256 {sha256[:12]}), quarantined {counts['quarantined']}")


def _sorted_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(entries, key=lambda entry: (entry["file"], entry["reason"]))


def _log_splits(assigned: Assigned, folds: dict[str, int], config: ExperimentConfig) -> None:
    group_by = config.dataset.group_by
    by_split: dict[str, list[str]] = {}
    for split, (stem, _, _) in assigned:
        by_split.setdefault(split, []).append(stem)
    message = ", ".join(f"{len(stems)} {split}" for split, stems in by_split.items())
    if config.dataset.folds is not None:
        how = f"{config.dataset.folds} folds of {[sum(1 for fold in folds.values() if fold == index) for index in range(config.dataset.folds)]} pairs"
    elif config.dataset.eval is not None:
        how = "named eval folders"
    else:
        how = f"eval_split {config.dataset.eval_share}"
    if group_by:
        keys = {split: sorted({group_key(stem, group_by) for stem in stems}) for split, stems in by_split.items()}
        for split, found in keys.items():
            shown = ", ".join(found[:10]) + (f" (+{len(found) - 10} more)" if len(found) > 10 else "")
            message += f"; {split}: {len(found)} group(s) {shown}"
        for split, other in (("train", "eval"), ("train", "test"), ("eval", "test")):
            shared = sorted(set(keys.get(split, [])) & set(keys.get(other, [])))
            if shared:  # only possible with named folders: the hash split never shares a group
                log(f"example_gen: WARNING: group(s) {', '.join(shared[:10])} of dataset.group_by are in both {split} and {other}")
    log(f"example_gen: split {message} ({how}, group_by {group_by!r})")


def _check_accounting(counts: dict[str, int]) -> None:
    """Every example that came in is either written or quarantined, exactly once."""
    if counts["examples_in"] != counts["examples_written"] + counts["quarantined"]:
        raise AccountingError(
            f"examples_in {counts['examples_in']} != examples_written {counts['examples_written']} + quarantined "
            f"{counts['quarantined']}: {counts['examples_in'] - counts['examples_written'] - counts['quarantined']} example(s) lost or duplicated"
        )


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _check(counts: dict[str, Any], config: ExperimentConfig, entries: list[dict[str, Any]]) -> None:
    if counts["examples_written"] == 0:
        reasons = "; ".join(f"{storage.basename(e['file'])}: {e['reason']}" for e in entries[:5])
        raise NoUsableExamplesError(
            f"no usable example in {config.dataset.images} / {config.dataset.masks} "
            f"({counts['examples_in']} inputs, all quarantined{': ' + reasons if reasons else ''})"
        )
    required = {"train": f"{config.dataset.images} / {config.dataset.masks}"}
    if config.dataset.folds is None:
        named = config.dataset.eval
        required["eval"] = f"{named.images} / {named.masks}" if named else f"eval_split {config.dataset.eval_share}; change dataset.eval_split"
    if config.dataset.test is not None:
        required["test"] = f"{config.dataset.test.images} / {config.dataset.test.masks}"
    for split, source in required.items():
        if counts.get(f"{split}_examples", 0) == 0:
            raise NoUsableExamplesError(f"the {split} split is empty ({counts['examples_written']} usable examples; {source})")
    for fold, count in enumerate(counts.get("fold_examples", [])):
        if count == 0:
            raise NoUsableExamplesError(f"fold {fold} of {config.dataset.folds} has no usable example (its pairs were all quarantined)")


def write_fold_view(examples_dir: str | os.PathLike[str], fold: int, target: str | os.PathLike[str]) -> Path:
    """The Examples of one fold's trainer and evaluator, written atomically to `target`:
    Split-train holds the train examples of every other fold, Split-eval those of `fold`,
    Split-test (when there is one) is copied. Records are copied as they are (no decoding),
    in their order, with ExampleGen's shard layout; counts.json and fingerprint.json as
    ExampleGen writes them, plus `fold`."""
    import tensorflow as tf

    source = Path(examples_dir)
    counts = read_counts(source)
    if "fold_examples" not in counts:
        raise ValueError(f"{source}: not the Examples of a k-fold run (no fold_examples in {COUNTS_FILE}); set dataset.folds")
    if not 0 <= fold < len(counts["fold_examples"]):
        raise ValueError(f"fold {fold} outside 0..{len(counts['fold_examples']) - 1} of {source}")
    records: dict[str, list[bytes]] = {"train": [], "eval": []}
    parse = {FOLD_FEATURE: tf.io.FixedLenFeature([], tf.int64)}
    for record in tf.data.TFRecordDataset(split_files(source, "train"), compression_type="GZIP"):
        held_out = int(tf.io.parse_single_example(record, parse)[FOLD_FEATURE]) == fold
        records["eval" if held_out else "train"].append(record.numpy())
    with atomic_dir(target) as out:
        for split, split_records in records.items():
            shards = max(1, min(MAX_SHARDS, math.ceil(len(split_records) / EXAMPLES_PER_SHARD)))
            for index in range(shards):
                write_shard(split_dir(out, split) / shard_name(index, shards), split_records[index::shards])
        if split_dir(source, "test").is_dir():
            shutil.copytree(split_dir(source, "test"), split_dir(out, "test"))
        view = {
            "fold": fold,
            "examples_written": sum(map(len, records.values())) + counts.get("test_examples", 0),
            "train_examples": len(records["train"]),
            "eval_examples": len(records["eval"]),
            **({"test_examples": counts["test_examples"]} if "test_examples" in counts else {}),
        }
        write_json(out / COUNTS_FILE, view)
        write_fingerprint(out)
    return Path(target)


@contextlib.contextmanager
def fold_view(examples_dir: str | os.PathLike[str], fold: int, target: Path) -> Iterator[Path]:
    """A k-fold trainer's or evaluator's Examples for the duration of its work: the fold view
    (`write_fold_view`) of `examples_dir` (a path or URI) at `target`, removed afterwards.
    `target` sits beside the task's outputs, where every worker of the task can read it."""
    with storage.localized(examples_dir) as local_examples:
        write_fold_view(local_examples, fold, target)
    try:
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)


