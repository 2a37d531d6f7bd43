"""`segflow report RUN_DIR`: one self-contained HTML page with a run's numbers and pictures.

Everything comes from the run folder as `segflow run` leaves it (summary.json, config.yaml,
and `<component>/<artifact>/` folders, see segflow/pipelines/local.py). The sample overlays and the
worst-k gallery are predicted with the run's served model through `serving_default` (the
signature users call and the evaluator scored), so they show what users get. Pictures are
PNGs embedded as data URIs and the stylesheet is inline: the page can be attached to a CI
job or mailed on its own. A section whose input the run lacks (a `validate` run has no
model, an old run no per-image metrics) says "not available: <why>" instead of failing.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from segflow.data.examples import (
    ANOMALIES_FILE,
    QUARANTINE_FILE,
    STATISTICS_FILE,
    iter_split,
    split_dir,
)
from segflow.evaluate.analyze import HISTORY_FILE, SUMMARY_FILE
from segflow.evaluate.evaluation import (
    BLESSED,
    METRICS_FILE,
    NOT_BLESSED,
    SLICES_FILE,
    read_blessing,
)
from segflow.export.exporters import BENCHMARK_FILE, EXPORTS_FILE
from segflow.export.predict import RUN_EXPORTS, RUN_SERVED_MODEL, RUN_STATISTICS
from segflow.utils.io import atomic_write_text, encode_png, read_json

REPORT_FILE = "report.html"
DEFAULT_WORST = 6
DEFAULT_SAMPLES = 4
PANEL_PIXELS = 256  # longest side of an overlay panel: a few dozen panels stay a few MB
QUARANTINE_ROWS = 20  # quarantined files listed by name; the rest are counted
PER_IMAGE_FILE = "per_image.jsonl"  # in the evaluator's Split-<split>/ (segflow.evaluate.beam_evaluation writes it)

# Where the components' artifacts sit in a run folder (segflow/pipelines/local.py: <component>/<artifact>).
RUN_EXAMPLES = Path("example_gen", "examples")
RUN_ANOMALIES = Path("example_validator", "anomalies")
RUN_HISTORY = Path("trainer", "model_run", HISTORY_FILE)
RUN_EVALUATION = Path("evaluator", "evaluation")
RUN_BLESSING = Path("evaluator", "blessing")

IGNORED_COLOUR = (255, 255, 255)
ERROR_COLOUR = np.array((0, 0, 0), np.float32)  # black: the qualitative class tables have red but no black
ERROR_PALENESS = 0.7  # share of white mixed into the true classes under the errors

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;background:#f4f5f7;font-size:14px}
header{background:#1d2330;color:#fff;padding:14px 28px}
header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#b8c0d0}
nav{background:#fff;border-bottom:1px solid #d9dce3;padding:8px 28px;position:sticky;top:0;z-index:1}
nav a{margin-right:16px;color:#2457c5;text-decoration:none}
main{padding:8px 28px 40px;max-width:1320px}
section{background:#fff;border:1px solid #d9dce3;border-radius:6px;padding:4px 20px 16px;margin:16px 0}
h2{font-size:18px;margin:14px 0 10px}
h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0}
th,td{border-bottom:1px solid #e3e5ea;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.scroll{overflow-x:auto}
.missing{color:#8a5a00;background:#fff6e0;border-left:4px solid #e0a500;padding:6px 10px}
.ok{color:#1b7a32;font-weight:600}
.bad{color:#b3261e;font-weight:600}
.note{color:#5b6275}
img.plot{max-width:100%;height:auto}
.row{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0 18px}
figure{margin:0}
figure img{width:256px;height:auto;image-rendering:pixelated;border:1px solid #d9dce3}
figcaption{font-size:12px;color:#5b6275;max-width:256px}
.example h3{margin-bottom:2px}
.legend span{display:inline-block;margin-right:14px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px;border:1px solid #888}
"""


class NotAvailable(Exception):
    """A section's input is missing from the run; the message says which and why."""


class ReportError(ValueError):
    """RUN_DIR cannot be reported on at all; the message names it."""


@dataclass
class Predicted:
    """One eval example with the served model's mask."""

    filename: str
    image: np.ndarray  # HxW x3 uint8, as shown
    truth: np.ndarray
    prediction: np.ndarray


@dataclass
class Run:
    """A run folder and what several sections share, read once."""

    path: Path
    worst: int
    samples: int
    predicted: dict[str, Predicted] = field(default_factory=dict)
    _model: Any = None

    def file(self, relative: str | os.PathLike[str]) -> Path:
        path = self.path / relative
        if not path.exists():
            raise NotAvailable(f"the run has no {relative}")
        return path

    def json(self, relative: str | os.PathLike[str]) -> Any:
        return read_json(self.file(relative))

    def optional_json(self, relative: str | os.PathLike[str]) -> Any:
        path = self.path / relative
        return read_json(path) if path.exists() else None

    def config(self) -> dict[str, Any]:
        path = self.path / "config.yaml"
        return yaml.safe_load(path.read_text()) if path.exists() else {}

    def slices(self) -> dict[str, list[dict[str, Any]]]:
        return self.json(RUN_EVALUATION / SLICES_FILE)

    def overall(self) -> dict[str, dict[str, Any]]:
        """split -> its overall metrics (eval first; test when ExampleGen wrote one)."""
        path = self.path / RUN_EVALUATION / SLICES_FILE
        if path.exists():
            return {split: next(entry["metrics"] for entry in entries if not entry["slice_key"]) for split, entries in read_json(path).items()}
        return {"eval": self.json(RUN_EVALUATION / METRICS_FILE)}

    def per_image(self) -> list[dict[str, Any]]:
        path = self.file(split_dir(RUN_EVALUATION, "eval") / PER_IMAGE_FILE)
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def model(self) -> Any:
        """The served model's mask predictor and spec, loaded once."""
        if self._model is None:
            from segflow.export.serving import ServingSpec, serving_mask_predictor

            serving = self.file(RUN_SERVED_MODEL)
            self._model = (serving_mask_predictor(serving), ServingSpec.load(serving))
        return self._model

    def predict(self, names: set[str] | None, limit: int) -> list[Predicted]:
        """Eval examples with predicted masks: those `names`, else the first `limit` of the
        split; predictions are kept for the next section."""
        examples = self.file(RUN_EXAMPLES)
        predictor, spec = self.model()
        chosen: list[Predicted] = []
        for example in iter_split(examples, "eval"):
            if len(chosen) == (len(names) if names is not None else limit):
                break
            if names is not None and example.filename not in names:
                continue
            if example.filename not in self.predicted:
                self.predicted[example.filename] = Predicted(
                    example.filename, _display_pixels(example.image, spec.value_max), example.mask, predictor(example.image)
                )
            chosen.append(self.predicted[example.filename])
        return chosen


# --- formatting ----------------------------------------------------------------------------------


def _escape(value: Any) -> str:
    return html.escape(str(value))


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _escape(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}"


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]], numeric_from: int = 1) -> str:
    """A table; cells from column `numeric_from` on are right-aligned numbers (or text)."""
    head = "".join(f"<th>{_escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_number(cell)}</td>' if index >= numeric_from else f"<td>{_escape(cell)}</td>" for index, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _missing(reason: str) -> str:
    return f'<p class="missing">not available: {_escape(reason)}</p>'


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(figure: Figure, alt: str) -> str:
    """The figure as an embedded PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return f'<img class="plot" src="{_data_uri(buffer.getvalue())}" alt="{_escape(alt)}">'


def _panel(pixels: np.ndarray, caption: str) -> str:
    """An RGB uint8 picture, shrunk to PANEL_PIXELS on its longest side, with a caption."""
    import cv2

    scale = PANEL_PIXELS / max(pixels.shape[:2])
    if scale < 1:
        size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    if (pixels == pixels[..., :1]).all():  # grey: one channel is a third of the bytes
        pixels = pixels[..., 0]
    return f'<figure><img src="{_data_uri(encode_png(pixels))}" alt="{_escape(caption)}"><figcaption>{_escape(caption)}</figcaption></figure>'


def _class_colours(count: int) -> np.ndarray:
    """One distinct RGB colour per class id (matplotlib's qualitative tables)."""
    from matplotlib import colormaps

    table = colormaps["tab10" if count <= 10 else "tab20"]
    return np.array([table(index % table.N)[:3] for index in range(count)], np.float32) * 255.0


def _class_names(run: Run) -> list[str]:
    """Class names in id order, from the evaluator's per-class metrics, else the statistics."""
    for relative, read in (
        (RUN_EVALUATION / METRICS_FILE, lambda value: list(value["per_class_iou"])),
        (RUN_STATISTICS / STATISTICS_FILE, lambda value: list(value["class_names"])),
    ):
        value = run.optional_json(relative)
        if value is not None:
            return read(value)
    raise NotAvailable("the run has neither evaluator metrics nor statistics to name the classes")


# --- sections ------------------------------------------------------------------------------------


def _summary(run: Run) -> str:
    summary = run.json(SUMMARY_FILE)
    config = run.config()
    rows: list[tuple[str, Any]] = [
        ("run folder", str(run.path)),
        ("config name", summary.get("name", config.get("name", "n/a"))),
        ("pipeline", summary.get("pipeline", "n/a")),
        ("status", summary.get("status", "n/a")),
        ("total time", f"{summary['seconds']:.1f} s" if "seconds" in summary else "n/a"),
    ]
    if config:
        classes = config.get("classes")
        rows += [
            ("model", f"{config.get('architecture')} / {config.get('backbone')}, input {config.get('shape')}"),
            ("classes", ", ".join(map(str, classes)) if isinstance(classes, list) else classes),
            ("stages", ", ".join(f"{stage.get('epochs')} epochs at {stage.get('learning_rate')}" for stage in config.get("stages") or [])),
        ]
    if "counts" in summary:
        counts = summary["counts"]
        rows.append(("examples", ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in counts.items())))
    for split, metrics in _overall_or_empty(run).items():
        rows.append((f"mean IoU ({split})", _number(metrics.get("mean_iou"), 4)))
    blessing = _blessing(run)
    rows.append(("blessing", blessing))
    if "push" in summary:
        push = summary["push"]
        rows.append(("pushed", push.get("destination", "n/a") if push.get("pushed") else f"no: {push.get('reason', 'not pushed')}"))
    if "config_hash" in summary:
        rows.append(("config hash", summary["config_hash"][:16]))
    if "data_fingerprint" in summary:
        rows.append(("data fingerprint", summary["data_fingerprint"][:16]))
    facts = "".join(f"<tr><th>{_escape(key)}</th><td>{value if key == 'blessing' else _escape(value)}</td></tr>" for key, value in rows)
    timings = [
        (name, entry.get("status", "n/a"), entry.get("seconds"), entry.get("error", ""))
        for name, entry in summary.get("components", {}).items()
    ]
    return f"<table>{facts}</table><h3>Components</h3>" + _table(("component", "status", "seconds", "error"), timings, numeric_from=2)


def _overall_or_empty(run: Run) -> dict[str, dict[str, Any]]:
    try:
        return run.overall()
    except NotAvailable:
        return {}


def _blessing(run: Run) -> str:
    """The blessing marker and its line (the failed thresholds, or all), as HTML."""
    folder = run.path / RUN_BLESSING
    for marker, css in ((BLESSED, "ok"), (NOT_BLESSED, "bad")):
        if (folder / marker).exists():
            return f'<span class="{css}">{marker}</span> <span class="note">{_escape((folder / marker).read_text().strip())}</span>'
    return "not available: the run has no evaluator blessing"


def _thresholds(run: Run) -> str:
    """Every blessing threshold: value, bound, the baseline's value, passed or not."""
    record = read_blessing(run.path / RUN_BLESSING)
    if record is None:
        raise NotAvailable(f"the run has no {RUN_BLESSING}/blessing.json")
    rows = [(entry["name"], entry["value"], entry["bound"], entry["baseline"], "passed" if entry["passed"] else "FAILED") for entry in record["thresholds"]]
    baseline = record["baseline"]
    against = "none (k-fold evaluation)" if baseline is None else f"version {baseline['version']}: {baseline['location']}" if baseline["location"] else f"none: {baseline['reason']}"
    return f"{_blessing(run)}<p>baseline: {_escape(against)}</p>" + _table(("threshold", "value", "bound", "baseline", "verdict"), rows)


def _read_history(run: Run) -> dict[str, list[float]]:
    with run.file(RUN_HISTORY).open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    if not rows:
        raise NotAvailable(f"{RUN_HISTORY} has no epochs")
    return {key: [float(row[key]) if row[key] not in ("", None) else math.nan for row in rows] for key in rows[0]}


def _stage_starts(config: dict[str, Any]) -> list[int]:
    """1-based epochs at which stages 2, 3, ... begin (each stage's epochs follow the last's)."""
    starts, epoch = [], 0
    for stage in (config.get("stages") or [])[:-1]:
        epoch += int(stage.get("epochs") or 0)
        starts.append(epoch + 1)
    return starts


def _training(run: Run) -> str:
    history = _read_history(run)
    epochs = [value + 1 for value in history["epoch"]]  # Keras counts from 0, people from 1
    starts = _stage_starts(run.config())
    try:
        names = _class_names(run)
    except NotAvailable:  # the curves do not need them: the per-class panel is left out
        names = []
    colours = {f"val_per_class_iou_{name}": tuple(colour / 255.0) for name, colour in zip(names, _class_colours(len(names)))}  # as in the overlays
    per_class = [key for key in colours if key in history]
    panels: list[tuple[str, list[tuple[str, str]], bool]] = [
        ("loss", [(key, key) for key in ("loss", "val_loss") if key in history], True),
        ("mean IoU", [(key, key) for key in ("mean_iou", "val_mean_iou", "val_pixel_accuracy") if key in history], False),
        ("eval IoU per class", [(key, key.removeprefix("val_per_class_iou_")) for key in per_class], False),
        ("learning rate", [("lr", "lr")] if "lr" in history else [], True),
    ]
    panels = [panel for panel in panels if panel[1]]
    figure = Figure(figsize=(12, 3.6 * math.ceil(len(panels) / 2)))
    axes = figure.subplots(math.ceil(len(panels) / 2), 2, squeeze=False).ravel()
    for axis, (title, series, log_scale) in zip(axes, panels):
        for key, label in series:
            axis.plot(epochs, history[key], marker="." if len(epochs) < 30 else None, label=label, color=colours.get(key))
        for start in starts:
            axis.axvline(start - 0.5, color="#888", linestyle="--", linewidth=1)
        values = [value for key, _ in series for value in history[key] if value > 0]
        if log_scale and values and max(values) > 10 * min(values):  # a first-epoch spike would flatten the rest; a constant rate reads better linear
            axis.set_yscale("log")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, ncol=2 if len(series) > 6 else 1)
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    figure.tight_layout()
    text = f"{len(epochs)} epochs"
    if "val_mean_iou" in history and not all(math.isnan(value) for value in history["val_mean_iou"]):
        best = int(np.nanargmax(history["val_mean_iou"]))
        text += f"; best eval mean IoU {history['val_mean_iou'][best]:.4f} at epoch {epochs[best]:g}, last {history['val_mean_iou'][-1]:.4f}"
    if starts:
        text += f"; dashed lines: stage boundaries (stages begin at epochs {', '.join(map(str, [1, *starts]))})"
    return f'<p class="note">{_escape(text)} (from {RUN_HISTORY})</p>' + _figure(figure, "training curves")


def _class_iou(run: Run) -> str:
    overall = run.overall()
    names = _class_names(run)
    figure = Figure(figsize=(9, max(2.4, 0.6 + 0.45 * len(names) * len(overall))))
    axis = figure.subplots()
    height = 0.8 / len(overall)
    positions = np.arange(len(names))
    for index, (split, metrics) in enumerate(overall.items()):
        values = [metrics["per_class_iou"].get(name) for name in names]
        drawn = [0.0 if value is None else value for value in values]
        bars = axis.barh(positions + index * height, drawn, height, label=f"{split} (mean {_number(metrics.get('mean_iou'))})")
        axis.bar_label(bars, labels=[_number(value) for value in values], padding=3, fontsize=8)
    axis.set_yticks(positions + height * (len(overall) - 1) / 2, names)
    axis.invert_yaxis()
    axis.set_xlim(0, 1.1)
    axis.set_xlabel("IoU")
    axis.grid(axis="x", alpha=0.3)
    axis.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(overall), fontsize=8, frameon=False)
    figure.tight_layout()
    keys = [("IoU", "per_class_iou"), ("precision", "per_class_precision"), ("recall", "per_class_recall"), ("dice", "per_class_dice"), ("boundary F1", "per_class_boundary_f1")]
    tables = ""
    for split, metrics in overall.items():
        present = [(label, key) for label, key in keys if key in metrics]
        rows = [[name, *(metrics[key].get(name) for _, key in present)] for name in names]
        headline = ", ".join(f"{label} {_number(metrics.get(key))}" for label, key in (("mean IoU", "mean_iou"), ("frequency-weighted IoU", "frequency_weighted_iou"), ("pixel accuracy", "pixel_accuracy"), ("boundary F1", "boundary_f1")) if key in metrics)
        tables += f"<h3>{_escape(split)}: {metrics.get('examples', '?')} images</h3><p>{headline}</p>" + _table(["class", *(label for label, _ in present)], rows)
    return _figure(figure, "per-class IoU") + tables


def _confusion(run: Run) -> str:
    overall = {split: metrics for split, metrics in run.overall().items() if "confusion_matrix" in metrics}
    if not overall:
        raise NotAvailable(f"the evaluator's {SLICES_FILE} and {METRICS_FILE} hold no confusion_matrix")
    names = _class_names(run)
    side = max(5.0, 0.55 * len(names) + 2.5)
    figure = Figure(figsize=(side * len(overall), side))
    for axis, (split, metrics) in zip(figure.subplots(1, len(overall), squeeze=False)[0], overall.items()):
        counts = np.array(metrics["confusion_matrix"], np.float64)
        totals = counts.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            shares = np.where(totals > 0, counts / totals, np.nan)
        image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        if len(names) <= 15:
            for (row, column), share in np.ndenumerate(shares):
                if not math.isnan(share):
                    axis.text(column, row, f"{share:.2f}", ha="center", va="center", fontsize=11 if len(names) <= 4 else 8, color="white" if share > 0.6 else "black")
        axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
        axis.set_yticks(range(len(names)), names)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(f"{split}: share of each true class")
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    figure.tight_layout()
    return '<p class="note">Rows are true classes, normalised to sum to 1: the diagonal is each class\'s recall. Blank rows: the class has no labelled pixels.</p>' + _figure(figure, "confusion matrix")


def _legend(run: Run) -> str:
    names = _class_names(run)
    colours = _class_colours(len(names))
    swatches = "".join(f'<span><i style="background:rgb{tuple(int(c) for c in colour)}"></i>{_escape(name)}</span>' for name, colour in zip(names, colours))
    return f'<p class="legend">{swatches}<span><i style="background:rgb{IGNORED_COLOUR}"></i>ignored</span><span><i style="background:rgb{tuple(int(c) for c in ERROR_COLOUR)}"></i>error</span></p>'


def _display_pixels(image: np.ndarray, value_max: float) -> np.ndarray:
    """RGB uint8 of a raw image, scaled by the model's value range like the model sees it."""
    import tensorflow as tf

    from segflow.data.preprocessing import scale_pixels, to_model_channels

    pixels = to_model_channels(scale_pixels(tf.constant(image, tf.float32), value_max), 3).numpy()
    return np.round(np.clip(pixels * 255.0, 0.0, 255.0)).astype(np.uint8)


def _label_picture(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    picture = np.empty((*labels.shape, 3), np.float32)
    picture[...] = IGNORED_COLOUR
    known = labels < len(colours)
    picture[known] = colours[labels[known]]
    return picture.astype(np.uint8)


def _example_row(predicted: Predicted, colours: np.ndarray, title: str) -> str:
    """Image, truth, prediction and errors: wrong pixels in black on the pale true classes, so
    a glance says which class was missed (and the panel compresses like a mask, unlike the
    image under it)."""
    labelled = predicted.truth < len(colours)
    wrong = labelled & (predicted.truth != predicted.prediction)
    errors = _label_picture(predicted.truth, colours).astype(np.float32) * (1.0 - ERROR_PALENESS) + 255.0 * ERROR_PALENESS
    errors[wrong] = ERROR_COLOUR
    share = wrong.sum() / max(int(labelled.sum()), 1)
    panels = [
        _panel(predicted.image, "image"),
        _panel(_label_picture(predicted.truth, colours), "truth"),
        _panel(_label_picture(predicted.prediction, colours), "prediction"),
        _panel(errors.astype(np.uint8), f"errors: {share:.1%} of labelled pixels"),
    ]
    return f'<div class="example"><h3>{_escape(title)}</h3><div class="row">{"".join(panels)}</div></div>'


def _per_image_or_empty(run: Run) -> dict[str, dict[str, Any]]:
    try:
        return {entry["filename"]: entry for entry in run.per_image()}
    except NotAvailable:
        return {}


def _image_title(predicted: Predicted, scores: dict[str, dict[str, Any]]) -> str:
    entry = scores.get(predicted.filename)
    if entry is None:
        return predicted.filename
    per_class = ", ".join(f"{name} {_number(value, 2)}" for name, value in entry.get("per_class_iou", {}).items())
    return f"{predicted.filename}: mean IoU {_number(entry.get('mean_iou'))} ({per_class})"


def _samples(run: Run) -> str:
    if run.samples <= 0:
        raise NotAvailable("--samples 0")
    chosen = run.predict(None, run.samples)
    if not chosen:
        raise NotAvailable("the eval split has no examples")
    colours = _class_colours(len(_class_names(run)))
    scores = _per_image_or_empty(run)
    note = f'<p class="note">{len(chosen)} eval image{"s" * (len(chosen) != 1)} in split order, predicted by the served model ({RUN_SERVED_MODEL}, serving_default).</p>'
    return note + _legend(run) + "".join(_example_row(item, colours, _image_title(item, scores)) for item in chosen)


def _worst(run: Run) -> str:
    if run.worst <= 0:
        raise NotAvailable("--worst 0")
    scored = [entry for entry in run.per_image() if entry.get("mean_iou") is not None]
    if not scored:
        raise NotAvailable(f"{PER_IMAGE_FILE} has no per-image mean IoU")
    worst = sorted(scored, key=lambda entry: (entry["mean_iou"], entry["filename"]))[: run.worst]
    found = {item.filename: item for item in run.predict({entry["filename"] for entry in worst}, len(worst))}
    colours = _class_colours(len(_class_names(run)))
    scores = {entry["filename"]: entry for entry in worst}
    rows = "".join(_example_row(found[entry["filename"]], colours, _image_title(found[entry["filename"]], scores)) for entry in worst if entry["filename"] in found)
    note = f'<p class="note">The {len(worst)} eval images with the lowest mean IoU of {len(scored)} (evaluator {PER_IMAGE_FILE}).</p>'
    return note + _legend(run) + rows


def _slices(run: Run) -> str:
    slices = run.slices()
    names = _class_names(run)
    parts = []
    for split, entries in slices.items():
        rows = [
            [entry["slice"], entry["metrics"].get("examples"), entry["metrics"].get("mean_iou"), entry["metrics"].get("pixel_accuracy"),
             entry["metrics"].get("boundary_f1"), *(entry["metrics"].get("per_class_iou", {}).get(name) for name in names)]
            for entry in entries
        ]
        header = ["slice", "images", "mean IoU", "pixel accuracy", "boundary F1", *(f"IoU {name}" for name in names)]
        parts.append(f"<h3>{_escape(split)}</h3>" + _table(header, rows))
    return "".join(parts)


def _exports(run: Run) -> str:
    exports_dir = run.file(RUN_EXPORTS)
    exports = run.json(RUN_EXPORTS / EXPORTS_FILE)
    benchmark = run.optional_json(RUN_EXPORTS / BENCHMARK_FILE) or {}
    latency = {name: row.get("latency") or benchmark.get("formats", {}).get(name, {}).get("latency") or {} for name, row in exports.items()}
    threads = sorted({key for cells in latency.values() for key in cells}, key=int)
    rows = []
    for name, row in exports.items():
        sidecar = read_json(exports_dir / row["sidecar"]) if row.get("sidecar") and (exports_dir / row["sidecar"]).is_file() else {}
        rows.append([
            name, row.get("file", ""), row.get("status", "skipped" if "bytes" not in row else "passed"), _quantization(row, sidecar), row.get("runtime", ""),
            _number(row["bytes"] / 1e6 if "bytes" in row else None, 2), _number(row.get("mean_iou"), 4), _number(row.get("mean_iou_drop"), 4), row.get("agreement_with_serving"),
            *(_number(latency[name].get(key, {}).get("median_ms"), 1) for key in threads), row.get("reason") or row.get("note") or "",
        ])
    header = ["export", "file", "parity gate", "quantization", "runtime", "MB", "mean IoU", "IoU drop", "agreement", *(f"ms @ {key} thread{'s' * (key != '1')}" for key in threads)]
    text = _table(header, [row[:-1] for row in rows], numeric_from=5)
    notes = "".join(f"<li><b>{_escape(row[0])}</b>: {_escape(row[-1])}</li>" for row in rows if row[-1])
    measured = f"Latency: median per image over {benchmark['runs']} rounds ({BENCHMARK_FILE})." if "runs" in benchmark else "No benchmark results in this run."
    return f'<p class="note">{_escape(measured)} Agreement: share of pixels on which the export\'s mask equals the served model\'s.</p>' + text + (f"<ul>{notes}</ul>" if notes else "")


def _quantization(row: dict[str, Any], sidecar: dict[str, Any]) -> str:
    """The scheme, with the quantized input and output types the sidecar records."""
    scheme = row.get("quantization", "n/a")
    details = sidecar.get("quantization", {})
    types = [f"{side} {details[side]['dtype']}" for side in ("input", "output") if isinstance(details.get(side), dict) and "dtype" in details[side]]
    return f"{scheme} ({', '.join(types)})" if types else scheme


def _data(run: Run) -> str:
    parts = []
    for title, build in (("Statistics", _statistics), ("Anomalies", _anomalies), ("Quarantined files", _quarantine)):
        try:
            parts.append(f"<h3>{title}</h3>" + build(run))
        except NotAvailable as reason:
            parts.append(f"<h3>{title}</h3>" + _missing(str(reason)))
    return "".join(parts)


def _statistics(run: Run) -> str:
    statistics = run.json(RUN_STATISTICS / STATISTICS_FILE)
    names = statistics.get("class_names") or _class_names(run)
    splits = [split for split in statistics if split != "class_names"]

    def joined(value: Any) -> str:
        if isinstance(value, dict):
            return ", ".join(f"{key}: {count}" for key, count in value.items())
        if isinstance(value, list):
            return ", ".join(_number(item) for item in value)
        return _number(value)

    fields = [("examples", "count"), ("image sizes", "image_sizes"), ("source channels", "source_channels"), ("bit depths", "bit_depths"),
              ("channel mean (0..1)", "channel_mean"), ("channel std (0..1)", "channel_std"), ("raw min", "channel_raw_min"), ("raw max", "channel_raw_max"),
              ("empty-mask share", "empty_mask_share"), ("ignored-pixel share", "ignored_pixel_share")]
    rows = [[label, *(joined(statistics[split].get(key)) for split in splits)] for label, key in fields]
    rows += [[f"pixel share: {name}", *(_number(_at(statistics[split].get("class_frequency"), index)) for split in splits)] for index, name in enumerate(names)]
    figure = Figure(figsize=(9, max(2.4, 0.6 + 0.4 * len(names) * len(splits))))
    axis = figure.subplots()
    height = 0.8 / max(len(splits), 1)
    for index, split in enumerate(splits):
        shares = [_at(statistics[split].get("class_frequency"), position) or 0.0 for position in range(len(names))]
        axis.barh(np.arange(len(names)) + index * height, shares, height, label=split)
    axis.set_yticks(np.arange(len(names)) + height * (len(splits) - 1) / 2, names)
    axis.invert_yaxis()
    axis.set_xlabel("share of labelled pixels")
    axis.set_title("class balance per split")
    axis.grid(axis="x", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return _table(["", *splits], rows, numeric_from=len(splits) + 1) + _figure(figure, "class balance")


def _at(values: list[Any] | None, index: int) -> Any:
    return values[index] if values is not None and index < len(values) else None


def _anomalies(run: Run) -> str:
    found = run.json(RUN_ANOMALIES / ANOMALIES_FILE)
    anomalies = found.get("anomalies", [])
    if not anomalies:
        return '<p class="ok">no anomalies</p>'
    return _table(("code", "split", "message"), [(entry.get("code"), entry.get("split"), entry.get("message")) for entry in anomalies], numeric_from=3)


def _quarantine(run: Run) -> str:
    path = run.file(RUN_EXAMPLES / QUARANTINE_FILE)
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not entries:
        return '<p class="ok">none: every image/mask pair was written</p>'
    rows = [(Path(str(entry.get("file", ""))).name, entry.get("reason", "")) for entry in entries[:QUARANTINE_ROWS]]
    more = f'<p class="note">and {len(entries) - QUARANTINE_ROWS} more in {RUN_EXAMPLES / QUARANTINE_FILE}</p>' if len(entries) > QUARANTINE_ROWS else ""
    return _table(("file", "reason"), rows, numeric_from=2) + more


SECTIONS: tuple[tuple[str, str, Callable[[Run], str]], ...] = (
    ("summary", "Summary", _summary),
    ("blessing", "Blessing thresholds", _thresholds),
    ("training", "Training curves", _training),
    ("class-iou", "Per-class IoU", _class_iou),
    ("confusion", "Confusion matrix", _confusion),
    ("samples", "Sample predictions", _samples),
    ("worst", "Worst images", _worst),
    ("slices", "Slices", _slices),
    ("exports", "Exports", _exports),
    ("data", "Data statistics and anomalies", _data),
)


def build_report(run_dir: str | os.PathLike[str], worst: int = DEFAULT_WORST, samples: int = DEFAULT_SAMPLES) -> str:
    """The HTML page of a run folder: every section, or why it is not available."""
    run = Run(Path(run_dir).resolve(), worst, samples)
    if not run.path.is_dir():
        raise ReportError(f"{run_dir}: no such run folder")
    summary = run.optional_json(SUMMARY_FILE) or {}
    name = summary.get("name") or run.config().get("name") or run.path.name
    bodies = []
    for anchor, title, build in SECTIONS:
        try:
            body = build(run)
        except NotAvailable as reason:
            body = _missing(str(reason))
        bodies.append(f'<section id="{anchor}"><h2>{_escape(title)}</h2>{body}</section>')
    links = "".join(f'<a href="#{anchor}">{_escape(title)}</a>' for anchor, title, _ in SECTIONS)
    subtitle = f"{run.path.name} · {summary.get('status', 'no summary.json')}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>segflow report: {_escape(name)}</title>'
        f"<style>{STYLE}</style></head><body><header><h1>{_escape(name)}</h1><p>{_escape(subtitle)}</p></header>"
        f"<nav>{links}</nav><main>{''.join(bodies)}</main></body></html>\n"
    )


def write_task_report(
    target: str | os.PathLike[str],
    evaluation: str | os.PathLike[str],
    blessing: str | os.PathLike[str],
    model: str | os.PathLike[str],
    examples: str | os.PathLike[str] | None,
    statistics: str | os.PathLike[str],
    anomalies: str | os.PathLike[str],
    model_run: str | os.PathLike[str],
) -> Path:
    """The page of an evaluator task (KFP's HTML artifact): a KFP task sees its own inputs
    and outputs, not the run folder, so the page is built from a folder laid out like one
    with links to them: the evaluation, blessing, served model, training history, data
    statistics, anomalies and, unless None (a k-fold evaluator's fold view), the examples.
    The exports come after the blessing, and the summary after the run: those sections say so."""
    with tempfile.TemporaryDirectory(prefix="segflow-task-report-") as staging:
        root = Path(staging) / "evaluator-task"  # the page's title
        links = {
            RUN_EVALUATION: evaluation, RUN_BLESSING: blessing, RUN_SERVED_MODEL.parent: model, RUN_HISTORY.parent: model_run,
            RUN_STATISTICS: statistics, RUN_ANOMALIES: anomalies,
        }
        if examples is not None:
            links[RUN_EXAMPLES] = examples
        for relative, source in links.items():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).symlink_to(Path(source).resolve(), target_is_directory=True)
        page = build_report(root)
    note = (
        '<section id="task"><h2>Evaluator task</h2><p class="note">Built inside the evaluator task from its inputs: the data '
        "statistics and anomalies, the training history, the served model, the examples, the evaluation and the blessing. The exports "
        "come after the blessing and the run's summary after the run: <code>segflow report RUN_DIR</code> builds the whole page from "
        "a run folder.</p></section>"
    )
    output = Path(target)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, page.replace("<main>", f"<main>{note}", 1))
    return output


def write_report(
    run_dir: str | os.PathLike[str], output: str | os.PathLike[str] | None = None, worst: int = DEFAULT_WORST, samples: int = DEFAULT_SAMPLES
) -> Path:
    """Write the page (default RUN_DIR/report.html) whole: a reader never sees half of it."""
    target = Path(output) if output is not None else Path(run_dir) / REPORT_FILE
    atomic_write_text(target, build_report(run_dir, worst, samples))
    return target.resolve()
