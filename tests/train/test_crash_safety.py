"""Crash safety: outputs are published whole or not at all, and training resumes.

Before: `atomic_dir` deleted the previous output before renaming the new one into place
(a window where neither existed), and checkpoints lived inside the trainer's temporary
output folder, deleted on any error, so a crash lost all training.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import tf_keras as keras

from segflow.utils.io import atomic_dir, commit_dir


def test_atomic_dir_replaces_without_deleting_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "artifact"
    with atomic_dir(target) as out:
        (out / "v").write_text("1")
    removed_while_target_missing: list[str] = []
    original_rmtree = __import__("shutil").rmtree

    def watching_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        if not target.exists():
            removed_while_target_missing.append(str(path))
        original_rmtree(path, *args, **kwargs)

    monkeypatch.setattr("segflow.utils.io.shutil.rmtree", watching_rmtree)
    with atomic_dir(target) as out:
        (out / "v").write_text("2")
    assert (target / "v").read_text() == "2" and removed_while_target_missing == []
    assert [path.name for path in tmp_path.iterdir()] == ["artifact"]  # no temporary left behind


def test_failed_block_keeps_the_previous_version(tmp_path: Path) -> None:
    target = tmp_path / "artifact"
    with atomic_dir(target) as out:
        (out / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as out:
        (out / "v").write_text("half")
        raise RuntimeError("crash")
    assert (target / "v").read_text() == "1"
    assert [path.name for path in tmp_path.iterdir()] == ["artifact"]


def test_commit_into_a_new_location_is_one_rename(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "x").write_text("x")
    commit_dir(fresh, tmp_path / "target")
    assert (tmp_path / "target" / "x").exists() and not fresh.exists()


class Crash(RuntimeError):
    pass


def test_trainer_resumes_after_a_crash(make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """A crash in stage 2 keeps stage 1's result and stage 2's last epoch in `backup/`;
    the rerun skips stage 1, continues stage 2, and the temporary outputs are gone."""
    from segflow.components.trainer import core as trainer
    from segflow.components.trainer.core import BACKUP_FOLDER
    from segflow.evaluate.analyze import HISTORY_FILE
    from tests.conftest import train_cores

    config = make_config(stages=[{"epochs": 1, "learning_rate": 0.003}, {"epochs": 2, "learning_rate": 0.001}])
    original = keras.callbacks.CSVLogger.on_epoch_end

    def crash_at_second_epoch(self: Any, epoch: int, logs: Any = None) -> None:
        if epoch == 1:
            raise Crash("simulated node failure")
        original(self, epoch, logs)

    monkeypatch.setattr(keras.callbacks.CSVLogger, "on_epoch_end", crash_at_second_epoch)
    with pytest.raises(Crash):
        train_cores(config, tmp_path)
    backup = tmp_path / BACKUP_FOLDER
    assert (backup / "stage-1.weights.h5").exists() and any((backup / "stage-2").iterdir())
    assert not (tmp_path / "model").exists() and not (tmp_path / "model_run").exists()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".model")]  # no half-written output

    monkeypatch.setattr(keras.callbacks.CSVLogger, "on_epoch_end", original)
    capfd.readouterr()
    trainer.run(config, tmp_path / "examples", tmp_path / "transform", tmp_path / "model", tmp_path / "model_run")
    assert "stage 1/2 finished before a restart" in capfd.readouterr().err
    epochs = [line.split(",")[0] for line in (tmp_path / "model_run" / HISTORY_FILE).read_text().splitlines()[1:]]
    assert epochs == ["0", "2"]  # epoch 1's backup was taken before the crash; 2 ran after the restart
    assert not backup.exists()
