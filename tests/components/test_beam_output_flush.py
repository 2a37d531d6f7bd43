"""Beam's multi_threading DirectRunner must not drop elements (segflow.utils.beam_runners.disable_time_based_flush).

Beam 2.77's in-process SDK workers flush their output buffer from a timer thread every second
while the bundle's thread keeps writing to it; an element written between the flush's copy and
its clear was lost, and ExampleGen failed its accounting on CamVid in most runs. The race needs
bundles longer than a second and records large enough that copying the buffer takes a while:
the tests below make both happen on small synthetic inputs.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from segflow.utils.beam_runners import pipeline_options
from segflow.components.example_gen import core as example_gen
from segflow.config.experiment import validate_config
from segflow.data.demo_data import write_demo_dataset
from tests.conftest import tiny_raw_config

REPETITIONS = 3


def _slow_large_records(item: tuple[int, int]) -> Iterator[tuple[int, bytes]]:
    """10 ms without the GIL (like decoding a CamVid PNG), then a 100 kB record."""
    key, _ = item
    time.sleep(0.01)
    yield key, bytes(100_000)


def _write_count(group: tuple[int, Any], out: str) -> None:
    key, records = group
    Path(out, str(key)).write_text(str(sum(1 for _ in records)))


def test_multi_threading_group_by_key_receives_every_element(tmp_path: Path) -> None:
    """480 slow, large elements over 8 keys, grouped by 2 worker threads (bundles of about
    2.4 s each): without the fix, 4 of 4 runs of this test missed an element."""
    import apache_beam as beam

    items = [(index % 8, index) for index in range(480)]
    for repetition in range(REPETITIONS):
        out = tmp_path / str(repetition)
        out.mkdir()
        with beam.Pipeline(options=pipeline_options("multi_threading", 2, tmp_path / "beam")) as pipeline:
            (
                pipeline
                | beam.Create(items, reshuffle=True)
                | beam.FlatMap(_slow_large_records)
                | beam.GroupByKey()
                | beam.Map(_write_count, out=str(out))
            )
        counts = {int(file.name): int(file.read_text()) for file in out.iterdir()}
        assert counts == {key: 60 for key in range(8)}, f"repetition {repetition}"


@pytest.fixture(scope="module")
def large_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Noisy 256x256 images: records of 100-200 kB, like CamVid's."""
    return write_demo_dataset(tmp_path_factory.mktemp("large") / "data", count=200, size=256)


def test_example_gen_multi_threading_writes_every_example(large_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ExampleGen in the default mode with 2 worker threads and several shards per split: every
    pair is written, in every run, with the same fingerprint. Without the fix, 3 of 4 runs of
    this test raised AccountingError."""
    real_process_pair = example_gen.process_pair

    def slow_process_pair(*args: Any) -> list[tuple[str, Any]]:
        time.sleep(0.015)  # CamVid's 360x480 pairs take this long to decode: bundles outlast 1 s
        return real_process_pair(*args)

    monkeypatch.setattr(example_gen, "process_pair", slow_process_pair)
    monkeypatch.setattr(example_gen, "EXAMPLES_PER_SHARD", 16)
    config = validate_config(tiny_raw_config(large_data, beam={"running_mode": "multi_threading", "num_workers": 2}))
    fingerprints = set()
    for repetition in range(REPETITIONS):
        counts = example_gen.run(config, tmp_path / str(repetition))
        assert (counts["examples_in"], counts["examples_written"], counts["quarantined"]) == (200, 200, 0)
        fingerprints.add((tmp_path / str(repetition) / "fingerprint.json").read_text())
        assert len(os.listdir(tmp_path / str(repetition) / "Split-train")) > 1
    assert len(fingerprints) == 1
