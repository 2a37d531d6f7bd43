"""Hard-negative crops: a share of the training crops centred where the model was wrong.

Every `refresh_every` epochs the trainer predicts every train image at full resolution
(blended tiles, as `serving_default` does) and keeps up to `keep` of its wrong pixels
(ignore_index excluded), drawn from a seed. Crops of epoch e read the error maps of refresh
e // refresh_every (none before the first: the stage's usual crops). The input pipeline
runs ahead of training, so a crop that needs a refresh not made yet waits for it (a
numpy_function on the pipeline's private threads): the crops are the same whatever the
thread timing, and a run stays reproducible. A resumed run refreshes with the weights it
resumes from, which differ from the uninterrupted run's when it resumes between refreshes.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow as tf
import tf_keras as keras

from segflow.data.preprocessing import tiled_probabilities

WAIT_SECONDS = 3600.0  # a crop waiting longer for a refresh gives up on it (uses the older maps) instead of hanging


class ErrorMaps:
    """Where the model was last wrong on each train image, readable inside tf.data."""

    def __init__(self, filenames: list[str], every: int, keep: int, seed: int) -> None:
        self.every, self.keep, self.seed = every, keep, seed
        keys = tf.constant(filenames)
        self.rows = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, tf.range(len(filenames), dtype=tf.int32)), default_value=-1)
        self.positions = tf.Variable(tf.zeros([len(filenames), keep, 2], tf.int32), trainable=False)
        self.counts = tf.Variable(tf.zeros([len(filenames)], tf.int32), trainable=False)
        self.version = 0
        self.closed = False
        self.condition = threading.Condition()

    def _wait(self, version: int) -> np.int64:
        deadline = time.monotonic() + WAIT_SECONDS
        with self.condition:
            while self.version < version and not self.closed and time.monotonic() < deadline:
                self.condition.wait(timeout=1.0)
            return np.int64(self.version)

    def candidates(self, filename: tf.Tensor, epoch: int) -> tf.Tensor:
        """[K, 2] int32 wrong pixels of the image in the maps of `epoch` (empty before the
        first refresh, for an unknown file, or with no errors); waits for those maps."""
        version = epoch // self.every
        if version == 0:
            return tf.zeros([0, 2], tf.int32)
        ready = tf.numpy_function(lambda: self._wait(version), [], tf.int64, stateful=True)
        with tf.control_dependencies([ready]):
            row = self.rows.lookup(filename)
            found = row >= 0
            safe = tf.maximum(row, 0)
            count = tf.where(found, tf.gather(self.counts, safe), 0)
            return tf.gather(self.positions, safe)[:count]

    def publish(self, version: int, positions: np.ndarray, counts: np.ndarray) -> None:
        """Sets the maps of refresh `version` and wakes the crops waiting for it."""
        self.positions.assign(positions)
        self.counts.assign(counts)
        with self.condition:
            self.version = version
            self.condition.notify_all()

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """While one `fit` reads crops: after it (ended or failed) no crop may wait any more,
        or the input pipeline's threads would hold its iterator open."""
        with self.condition:
            self.closed = False
        try:
            yield
        finally:
            with self.condition:
                self.closed = True
                self.condition.notify_all()


def wrong_pixels(probabilities: tf.Tensor, mask: tf.Tensor, ignore_index: int | None) -> tf.Tensor:
    """[N, 2] int32 positions where the argmax of [H,W,K] probabilities is not the [H,W] label."""
    wrong = tf.not_equal(tf.cast(tf.argmax(probabilities, axis=-1), mask.dtype), mask)
    if ignore_index is not None:
        wrong &= tf.not_equal(mask, ignore_index)
    return tf.cast(tf.where(wrong), tf.int32)


def draw_positions(positions: tf.Tensor, keep: int, seed: tuple[int, int]) -> np.ndarray:
    """At most `keep` of [N, 2] positions, chosen by a stateless draw, padded to [keep, 2]."""
    order = tf.argsort(tf.random.stateless_uniform([tf.shape(positions)[0]], seed))[:keep]
    chosen = tf.gather(positions, order).numpy()
    return np.concatenate([chosen, np.zeros([keep - len(chosen), 2], np.int32)])


class RefreshErrorMaps(keras.callbacks.Callback):
    """Predicts the train images and publishes their error maps every `every` epochs; at a
    stage's (or a resumed run's) first epoch, the maps that epoch needs if they are missing."""

    def __init__(
        self,
        maps: ErrorMaps,
        end_epoch: int,
        examples: tf.data.Dataset,
        predict: Callable[[tf.Tensor], tf.Tensor],
        tile: tuple[int, int],
        ignore_index: int | None,
        report: Callable[[str], None],
    ) -> None:
        super().__init__()
        self.maps, self.every, self.end_epoch = maps, maps.every, end_epoch
        self.examples, self.predict, self.tile, self.ignore_index, self.report = examples, predict, tile, ignore_index, report

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if self.maps.version < epoch // self.every:
            self.refresh(epoch // self.every)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if (epoch + 1) % self.every == 0 and epoch + 1 < self.end_epoch:
            self.refresh((epoch + 1) // self.every)

    def refresh(self, version: int) -> None:
        started = time.perf_counter()
        positions = np.zeros(self.maps.positions.shape, np.int32)
        counts = np.zeros(self.maps.counts.shape, np.int32)
        wrong_total = pixels = 0
        for image, mask, name in self.examples:
            row = int(self.maps.rows.lookup(name))
            probabilities = tiled_probabilities(self.predict, image[None], self.tile)[0]
            wrong = wrong_pixels(probabilities, mask, self.ignore_index)
            positions[row] = draw_positions(wrong, self.maps.keep, (self.maps.seed * 1_000_003 + version, row))
            counts[row] = min(len(wrong), self.maps.keep)
            wrong_total += len(wrong)
            pixels += int(tf.size(mask))
        self.maps.publish(version, positions, counts)
        self.report(
            f"hard negatives: error maps {version} of {len(counts)} train images, {wrong_total / max(pixels, 1):.2%} of their pixels wrong "
            f"({time.perf_counter() - started:.1f} s)"
        )
