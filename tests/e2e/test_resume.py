"""`segflow run --resume`: a trainer process killed after epoch 2 (SIGKILL, as the kernel's
OOM killer or a lost node would) is continued by the command a user types, from epoch 3 with
its optimizer's step count.
"""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from segflow.data.examples import read_counts
from segflow.components.trainer.core import BACKUP_FOLDER
from segflow.train.multiworker import KILL_WORKER_ENV
from segflow.evaluate.analyze import HISTORY_FILE
from segflow.utils.io import read_json
from tests.conftest import tiny_raw_config


def _segflow(*arguments: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "segflow.cli", *arguments], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # the whole DAG twice: about 4 minutes on 2 shared cores
def test_killed_trainer_resumes_from_its_last_epoch_with_its_optimizer_steps(tiny_data: Path, tmp_path: Path) -> None:
    raw = tiny_raw_config(tiny_data, stages=[{"epochs": 4, "learning_rate": 0.003}], export=["saved_model"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    env = {key: value for key, value in os.environ.items() if key != KILL_WORKER_ENV}

    killed = _segflow("run", "config.yaml", "--output", str(run), cwd=tmp_path, env={**env, KILL_WORKER_ENV: "0:2"})
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert "killing this worker after epoch 2" in killed.stdout + killed.stderr, killed.stdout[-3000:]
    assert read_json(run / "summary.json")["status"] == "failed"
    backup = run / "trainer" / BACKUP_FOLDER
    assert len((backup / HISTORY_FILE).read_text().splitlines()) == 1 + 2  # header, epochs 1 and 2
    assert not (run / "trainer" / "model").exists()

    resumed = _segflow("run", "--resume", str(run), cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = read_json(run / "summary.json")
    assert summary["status"] == "succeeded" and summary["training"]["epochs_before_resume"] == 2
    assert "resumed after 2 epochs" in resumed.stdout

    with open(run / "trainer" / "model_run" / HISTORY_FILE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = math.ceil(read_counts(run / "example_gen" / "examples")["train_examples"] / raw["batch"])
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2, 3]  # epochs 1-2 before the kill, 3-4 after
    # A fresh optimizer would count from 0 again: epoch 3 ends at 3 epochs' steps only if epoch 2's count was restored.
    assert [int(float(row["optimizer_steps"])) for row in rows] == [steps, 2 * steps, 3 * steps, 4 * steps]
    assert not (run / ".resume-backup").exists() and not backup.exists()
    # The final metrics are the run's last epoch, not only what the resumed process trained.
    final = read_json(run / "trainer" / "model_run" / "final_metrics.json")
    assert final["val_mean_iou"] == float(rows[-1]["val_mean_iou"]) and final["optimizer_steps"] == 4 * steps


def test_resume_takes_only_the_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The run folder's config.yaml is the config: a CONFIG, --set or --output beside --resume is refused."""
    from segflow.cli import main

    assert main(["run", "other.yaml", "--set", "batch=2", "--resume", str(tmp_path)]) == 2
    assert "drop CONFIG, --set" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "no config.yaml; not a segflow run folder" in capsys.readouterr().err
    assert main(["run"]) == 2
    assert "needs a CONFIG.yaml (or --resume RUN_DIR)" in capsys.readouterr().err
