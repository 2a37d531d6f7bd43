"""Every registered schedule against hand-computed values, warmup, ReduceOnPlateau on a
cyclical schedule, and `segflow lr-find` on the tiny dataset."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from segflow.config.experiment import PlateauConfig, ScheduleConfig, validate_config
from segflow.utils.registry import SCHEDULES
from segflow.train.schedules import ReduceOnPlateau, StageSchedule, build_schedule

from tests.conftest import tiny_raw_config

RATE = 0.1
STEPS_PER_EPOCH = 10
EPOCHS = 4  # 40 steps in the stage

# schedule settings -> {step: hand-computed rate}; every registered name needs a row.
EXPECTED: dict[str, list[tuple[dict[str, Any], dict[int, float]]]] = {
    "constant": [({}, {0: 0.1, 17: 0.1, 39: 0.1})],
    "exponential": [({"decay_rate": 0.5, "decay_epochs": 2.0}, {0: 0.1, 20: 0.05, 10: 0.1 * 0.5**0.5, 40: 0.025})],
    "polynomial": [
        ({"min_learning_rate": 0.01, "power": 1.0}, {0: 0.1, 20: 0.055, 40: 0.01, 60: 0.01}),
        ({"power": 2.0}, {10: 0.1 * 0.75**2, 30: 0.1 * 0.25**2}),
    ],
    "cosine": [
        ({}, {0: 0.1, 20: 0.05, 40: 0.0, 10: 0.05 * (1 + math.cos(math.pi / 4))}),
        ({"min_learning_rate": 0.02}, {20: 0.06, 40: 0.02}),
        # warmup 1 epoch (10 steps): 0.1 * step / 10, then cosine over the remaining 30 steps
        ({"warmup_epochs": 1.0}, {0: 0.0, 5: 0.05, 10: 0.1, 25: 0.05, 40: 0.0}),
    ],
    "cyclical": [
        # one cycle = 2 epochs = 20 steps: low at 0 and 20, peak at 10
        ({"min_learning_rate": 0.02, "cycle_epochs": 2.0}, {0: 0.02, 5: 0.06, 10: 0.1, 15: 0.06, 20: 0.02, 30: 0.1}),
        ({"min_learning_rate": 0.02, "cycle_epochs": 2.0, "mode": "triangular2"}, {10: 0.1, 30: 0.06, 50: 0.04}),
        ({"min_learning_rate": 0.02, "cycle_epochs": 2.0, "mode": "exp_range", "gamma": 0.5}, {10: 0.02 + 0.08 * 0.5, 30: 0.02 + 0.08 * 0.125}),
    ],
}


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_schedule_matches_hand_computed_values(name: str) -> None:
    assert name in EXPECTED, f"schedule {name!r} has no hand-computed values in EXPECTED"
    for settings, values in EXPECTED[name]:
        schedule = build_schedule(ScheduleConfig(name=name, **settings), RATE, STEPS_PER_EPOCH, EPOCHS)
        for step, expected in values.items():
            assert float(schedule(step)) == pytest.approx(expected, abs=1e-7), (settings, step)


def test_a_schedule_round_trips_its_config() -> None:
    schedule = build_schedule(ScheduleConfig(name="cyclical", mode="triangular2", min_learning_rate=0.01), RATE, STEPS_PER_EPOCH, EPOCHS)
    copy = StageSchedule.from_config(schedule.get_config())
    assert [float(copy(step)) for step in (3, 27)] == [float(schedule(step)) for step in (3, 27)]


def test_reduce_on_plateau_lowers_the_cyclical_peak() -> None:
    schedule = build_schedule(ScheduleConfig(name="cyclical", min_learning_rate=0.02, cycle_epochs=2.0), RATE, STEPS_PER_EPOCH, EPOCHS)
    plateau = ReduceOnPlateau(schedule, PlateauConfig(factor=0.5, patience=2, min_scale=0.2), "val_mean_iou", "max")
    for score in (0.5, 0.6, 0.6, 0.55):  # improves, then 2 epochs without improvement
        plateau.on_epoch_end(0, {"val_mean_iou": score})
    assert float(schedule(10)) == pytest.approx(0.05)  # the peak halved
    for score in (0.6, 0.6, 0.6, 0.6, 0.6, 0.6):
        plateau.on_epoch_end(0, {"val_mean_iou": score})
    assert float(schedule.scale.numpy()) == pytest.approx(0.2)  # never below min_scale
    with pytest.raises(KeyError, match="val_loss"):
        ReduceOnPlateau(schedule, PlateauConfig(), "val_loss", "min").on_epoch_end(0, {"loss": 1.0})


def test_schedule_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown schedule 'onecycle'"):
        ScheduleConfig(name="onecycle")
    with pytest.raises(ValueError, match="min_learning_rate"):
        validate_config(tiny_raw_config(tmp_path, schedule={"name": "cosine", "min_learning_rate": 0.5}))


def test_lr_find_writes_the_curve_and_a_suggestion(tiny_data: Path, tmp_path: Path) -> None:
    from segflow.cli import main

    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(json.dumps(tiny_raw_config(tiny_data)))  # JSON is YAML
    assert main(["lr-find", str(config_path), "-o", str(tmp_path / "sweep"), "--steps", "24", "--min-rate", "1e-5", "--max-rate", "1.0"]) == 0
    result = json.loads((tmp_path / "sweep" / "lr_find.json").read_text())
    assert (tmp_path / "sweep" / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rates = result["learning_rates"]
    assert 3 <= result["steps"] == len(rates) == len(result["losses"]) <= 24
    assert rates[0] == pytest.approx(1e-5) and np.all(np.diff(rates) > 0)
    assert rates[0] <= result["suggested_learning_rate"] <= rates[-1]
