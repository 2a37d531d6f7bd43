"""`segflow lr-find CONFIG`: the learning-rate range test (Smith 2017).

The data go through the same components as a run (ExampleGen, StatisticsGen, SchemaGen,
Transform, into the output folder), then the first stage's network trains one step at each
rate of an exponential sweep from `min_rate` to `max_rate`. The loss curve is smoothed (an
exponential moving average with bias correction over `window` of the steps, so single noisy
batches do not decide),
and the suggestion is the rate where the smoothed loss falls fastest against log(rate):
large enough to learn quickly, below where the loss turns up.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segflow.config.experiment import ExperimentConfig
from segflow.utils.errors import ConfigError

PLOT_FILE = "lr_find.png"
RESULT_FILE = "lr_find.json"


@dataclass(frozen=True)
class SweepSettings:
    steps: int = 200
    min_rate: float = 1e-7
    max_rate: float = 1.0
    window: float = 0.05  # the moving average spans this share of the steps: a fixed beta lags on short sweeps
    divergence: float = 4.0  # stop once a loss exceeds this many times the lowest


def smooth(losses: list[float], beta: float) -> np.ndarray:
    """Exponential moving average of the losses, bias-corrected (fastai's range test)."""
    average, out = 0.0, []
    for index, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta**index))
    return np.array(out)


def suggest(rates: np.ndarray, smoothed: np.ndarray) -> float:
    """The rate of the steepest descent of the smoothed loss against log(rate)."""
    if len(smoothed) < 3:
        raise ConfigError(f"lr-find: only {len(smoothed)} steps before the loss diverged; lower --min-rate or raise --steps")
    slopes = np.gradient(smoothed, np.log(rates[: len(smoothed)]))
    return float(rates[int(np.argmin(slopes))])


def _plot(path: Path, rates: np.ndarray, losses: list[float], smoothed: np.ndarray, suggested: float) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    axes.plot(rates[: len(losses)], losses, color="0.75", linewidth=1, label="loss per step")
    axes.plot(rates[: len(smoothed)], smoothed, color="tab:blue", linewidth=2, label="smoothed")
    axes.axvline(suggested, color="tab:red", linestyle="--", label=f"suggested {suggested:.2e}")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.legend()
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def find_learning_rate(config: ExperimentConfig, output: str | os.PathLike[str], settings: SweepSettings = SweepSettings()) -> dict[str, Any]:
    """Run the sweep into `output` (the components' folders, the PNG and the JSON) and return the JSON."""
    from segflow.components.example_gen import core as example_gen
    from segflow.components.schema_gen import core as schema_gen
    from segflow.components.statistics_gen import core as statistics_gen
    from segflow.components.transform import core as transform
    from segflow.train.lr_sweep import sweep_learning_rate
    from segflow.utils.io import write_json

    if settings.steps < 3 or not 0 < settings.min_rate < settings.max_rate:
        raise ConfigError(f"lr-find: needs at least 3 steps and 0 < min rate < max rate, got {settings}")
    root = Path(output)
    example_gen.run(config, root / "examples")
    statistics_gen.run(config, root / "examples", root / "statistics")
    schema_gen.run(config, root / "statistics", root / "schema")
    transform.run(config, root / "examples", root / "schema", root / "transform")
    rates = np.geomspace(settings.min_rate, settings.max_rate, settings.steps)
    losses = sweep_learning_rate(config, root / "examples", root / "transform", rates, settings.divergence, transform.transform_layer)
    smoothed = smooth(losses, 1.0 - 1.0 / max(1.0, settings.window * settings.steps))
    suggested = suggest(rates, smoothed)
    _plot(root / PLOT_FILE, rates, losses, smoothed, suggested)
    result = {
        "suggested_learning_rate": suggested,
        "plot": str(root / PLOT_FILE),
        "steps": len(losses),
        "stopped_early": len(losses) < settings.steps,
        "learning_rates": rates[: len(losses)].tolist(),
        "losses": losses,
        "smoothed_losses": smoothed.tolist(),
    }
    write_json(root / RESULT_FILE, result)
    return result
