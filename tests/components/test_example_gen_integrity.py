"""ExampleGen integrity: honest splits (exact share, groups never cut), byte-identical output
on every run (fingerprint.json), and accounting (in = written + quarantined; skipped listed)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tensorflow as tf
import tifffile

from segflow.components.example_gen import core as example_gen
from segflow.config.experiment import ExperimentConfig, load_config, validate_config
from segflow.data.examples import SPLITS, assign_splits, deserialize, group_key, iter_split, read_fingerprint, split_dir
from tests.conftest import require_dataset

REPO = Path(__file__).resolve().parents[2]


def _sizes(splits: dict[str, str]) -> Counter[str]:
    return Counter(splits.values())


def test_eval_share_is_exact() -> None:
    assert _sizes(assign_splits([str(index) for index in range(1, 31)], 0.2)) == {"train": 24, "eval": 6}
    assert _sizes(assign_splits([f"img{index:03d}" for index in range(367)], 0.2)) == {"train": 294, "eval": 73}
    for eval_split in (0.01, 0.5, 0.99):  # two examples: one in each split, whatever the share
        assert _sizes(assign_splits(["a", "b"], eval_split)) == {"train": 1, "eval": 1}
    with pytest.raises(ValueError, match=r"cannot split 1 example\(s\).*eval_split 0.2"):
        assign_splits(["only"], 0.2)
    with pytest.raises(ValueError, match=r"cannot split 0 example\(s\)"):
        assign_splits([], 0.3)


def test_split_does_not_depend_on_listing_order() -> None:
    stems = [f"x{index}" for index in range(50)]
    assert assign_splits(stems, 0.3) == assign_splits(sorted(stems, reverse=True), 0.3)


@pytest.mark.parametrize("eval_split", [0.05, 0.2, 0.35, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("pattern", [r"^seq[A-Z]", r"^(seq[A-Z])_"])
def test_group_by_never_splits_a_group(eval_split: float, pattern: str) -> None:
    sizes = {"A": 3, "B": 17, "C": 8, "D": 1, "E": 30, "F": 5}
    stems = [f"seq{group}_{index:03d}" for group, size in sizes.items() for index in range(size)] + ["loose", "other"]
    splits = assign_splits(stems, eval_split, pattern)
    by_group: dict[str, set[str]] = {}
    for stem, split in splits.items():
        by_group.setdefault(group_key(stem, pattern), set()).add(split)
    assert set(by_group) == {"seqA", "seqB", "seqC", "seqD", "seqE", "seqF", "loose", "other"}  # no match: own group
    assert all(len(names) == 1 for names in by_group.values())
    assert set(splits) == set(stems) and set(splits.values()) == set(SPLITS)


def test_group_by_keeps_the_eval_count_near_the_target_and_needs_two_groups() -> None:
    stems = [f"p{patient}_{index}" for patient in range(20) for index in range(5)]  # 20 groups of 5
    assert _sizes(assign_splits(stems, 0.2, r"^p\d+")) == {"train": 80, "eval": 20}
    assert _sizes(assign_splits(["a_1", "a_2", "a_3", "b_1", "b_2", "b_3"], 0.8, "^[^_]+")) == {"train": 3, "eval": 3}
    with pytest.raises(ValueError, match=r"group_by '\^\[\^_\]\+' puts all 3 examples in one group 'a'"):
        assign_splits(["a_1", "a_2", "a_3"], 0.2, "^[^_]+")


def _shards(examples: Path) -> dict[str, bytes]:
    return {str(path.relative_to(examples)): path.read_bytes() for split in SPLITS for path in sorted(split_dir(examples, split).iterdir())}


def test_two_runs_write_byte_identical_shards_and_fingerprints(
    tmp_path: Path, make_config: Callable[..., ExperimentConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(example_gen, "EXAMPLES_PER_SHARD", 4)  # several shards per split
    config = make_config(beam={"running_mode": "multi_threading", "num_workers": 2})
    first, second = tmp_path / "first", tmp_path / "second"
    example_gen.run(config, first)
    example_gen.run(config, second)
    shards = _shards(first)
    assert sorted(shards) == [*(f"Split-eval/data-0000{i}-of-00002.tfrecord.gz" for i in range(2)), *(f"Split-train/data-0000{i}-of-00004.tfrecord.gz" for i in range(4))]
    assert shards == _shards(second)
    fingerprint = read_fingerprint(first)
    assert fingerprint == read_fingerprint(second)
    assert fingerprint["shards"] == {name: hashlib.sha256(data).hexdigest() for name, data in shards.items()}
    assert all(data[4:8] == b"\0\0\0\0" for data in shards.values())  # no gzip timestamp
    for name in shards:  # each shard sorted by file name
        names = [deserialize(record.numpy()).filename for record in tf.data.TFRecordDataset(str(first / name), compression_type="GZIP")]
        assert names and names == sorted(names)
    assert sum(1 for split in SPLITS for _ in iter_split(first, split)) == 20


def test_accounting_identity_is_enforced(tmp_path: Path, make_config: Callable[..., ExperimentConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    write_shard = example_gen.write_shard

    def lossy(path: Path, records) -> None:  # a writer that loses the last record of each shard
        write_shard(path, list(records)[:-1])

    monkeypatch.setattr(example_gen, "write_shard", lossy)
    with pytest.raises(example_gen.AccountingError, match=r"examples_in 20 != examples_written 18 \+ quarantined 0"):
        example_gen.run(make_config(), tmp_path / "examples")
    assert not (tmp_path / "examples").exists()


def test_expanded_pages_are_counted_in_and_written_in_page_order(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for stem, pages in {"a": 3, "b": 2, "c": 1, "d": 4}.items():
        for folder, high in ((images, 255), (masks, 1)):
            with tifffile.TiffWriter(folder / f"{stem}.tif") as writer:
                for _ in range(pages):
                    writer.write(rng.integers(0, high, (8, 8), endpoint=True).astype(np.uint8))
    raw = {"name": "pages", "dataset": {"images": str(images), "masks": str(masks), "eval_split": 0.25, "multipage": "expand"}, "classes": 2, "shape": [16, 16, 1], "beam": {"running_mode": "in_memory"}}
    counts = example_gen.run(validate_config(raw), tmp_path / "examples")
    assert counts["examples_in"] == counts["examples_written"] == 10 and counts["quarantined"] == 0
    names = [example.filename for split in SPLITS for example in iter_split(tmp_path / "examples", split)]
    assert sorted(names) == sorted({*(f"a.tif#page{k}" for k in (1, 2, 3)), "b.tif#page1", "b.tif#page2", "c.tif", *(f"d.tif#page{k}" for k in (1, 2, 3, 4))})
    assert [name for name in names if name.startswith("d.tif")] == [f"d.tif#page{k}" for k in (1, 2, 3, 4)]


def test_hidden_files_and_subfolders_are_listed_as_skipped(
    tiny_data: Path, tmp_path: Path, make_config: Callable[..., ExperimentConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "images" / ".DS_Store").write_bytes(b"\0")
    (data / "masks" / ".000.png").write_bytes((data / "masks" / "000.png").read_bytes())
    (data / "images" / "extra").mkdir()
    (data / "images" / "extra" / "000.png").write_bytes((data / "images" / "000.png").read_bytes())
    temp_dirs: list[str] = []
    beam_options = example_gen.beam_options
    monkeypatch.setattr(example_gen, "beam_options", lambda *args: temp_dirs.append(str(args[-1])) or beam_options(*args))

    examples = tmp_path / "examples"
    counts = example_gen.run(make_config(dataset={"images": str(data / "images"), "masks": str(data / "masks")}), examples)
    assert counts["examples_in"] == 20 and counts["examples_written"] == 20 and counts["quarantined"] == 0 and counts["skipped"] == 3
    assert json.loads((examples / "counts.json").read_text()) == counts
    skipped = {Path(entry["file"]).relative_to(data).as_posix(): entry for entry in map(json.loads, (examples / "skipped.jsonl").read_text().splitlines())}
    assert set(skipped) == {"images/.DS_Store", "masks/.000.png", "images/extra"}
    assert all(entry["skipped"] is True for entry in skipped.values())
    assert "hidden" in skipped["images/.DS_Store"]["reason"] and "not a file" in skipped["images/extra"]["reason"]
    assert (examples / "quarantine.jsonl").read_text() == ""
    # Beam's temporary files and side outputs live inside the artifact, and are gone after it
    assert len(temp_dirs) == 1 and Path(temp_dirs[0]).parents[1].parent == tmp_path and Path(temp_dirs[0]).parents[1].name.startswith(".examples.")
    assert sorted(path.name for path in examples.iterdir()) == ["Split-eval", "Split-train", "counts.json", "fingerprint.json", "quarantine.jsonl", "skipped.jsonl"]


@pytest.mark.slow
@pytest.mark.realdata
def test_isbi_eval_split_is_exactly_six_images(tmp_path: Path, make_config: Callable[..., ExperimentConfig]) -> None:
    isbi = require_dataset("isbi2012_membrane")
    config = make_config(dataset={"images": str(isbi / "image"), "masks": str(isbi / "label"), "eval_split": 0.2}, classes=2, mask_values=[0, 255], shape=[64, 64, 1])
    counts = example_gen.run(config, tmp_path / "examples")
    assert counts["eval_examples"] == 6 and counts["train_examples"] == 24


@pytest.mark.slow
@pytest.mark.realdata
def test_camvid_config_uses_the_official_split() -> None:
    """SegNet's split as published (367 train, 101 val, 233 test): its folders, not a hash
    split of the train folder (the published split shares two sequences; ExampleGen warns)."""
    camvid = require_dataset("camvid")
    config = load_config(REPO / "configs" / "camvid.yaml")
    assert config.dataset.eval_split is None and config.dataset.eval is not None and config.dataset.test is not None
    folders = {"train": config.dataset.images, "eval": config.dataset.eval.images, "test": config.dataset.test.images}
    assert {split: Path(folder).resolve() for split, folder in folders.items()} == {
        "train": (camvid / "train").resolve(), "eval": (camvid / "val").resolve(), "test": (camvid / "test").resolve()
    }
    assert {split: len(os.listdir(folder)) for split, folder in folders.items()} == {"train": 367, "eval": 101, "test": 233}


def test_serialized_examples_do_not_depend_on_the_process_hash_seed() -> None:
    """Two runs are two processes with different string hash seeds; a proto map serialized
    without `deterministic=True` comes out in a different order in each (seen: equal
    features, different shard bytes and fingerprints between two `segflow run`s)."""
    import subprocess
    import sys

    program = (
        "import numpy as np, hashlib; from segflow.data.examples import SegmentationExample, serialize; "
        "e = SegmentationExample('a.png', np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)); "
        "print(hashlib.sha256(serialize(e)).hexdigest())"
    )
    digests = {
        subprocess.run([sys.executable, "-c", program], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True).stdout
        for seed in ("1", "2", "3", "4")
    }
    assert len(digests) == 1
