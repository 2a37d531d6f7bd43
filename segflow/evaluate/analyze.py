"""`segflow analyze RUN_DIR...`: compare finished runs side by side.

A sweep leaves many run folders whose configs differ in a key or two; what matters is which
keys differ and what each run scored. This reads each folder's `config.yaml` (as plain YAML,
so a run made by an older segflow still loads), `summary.json` and the trainer's
`history.csv`, and reports only the differing config keys (dotted paths) with the runs'
metrics, best run first: a console table, a CSV row per run, and one self-contained HTML
page with the plots embedded.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# A run folder's files, named once here (the lowest layer that reads them): the local runner and the
# components that write them import these names.
SUMMARY_FILE = "summary.json"
HISTORY_FILE = "history.csv"  # the trainer's per-epoch CSV
# Files of a run folder worth pointing at, by what they are; absent ones are left out.
ARTIFACT_FILES = {
    "config": "config.yaml",
    "history": f"trainer/model_run/{HISTORY_FILE}",
    "training": "trainer/model_run/training.json",
    "evaluation": "evaluator/evaluation/metrics.json",
    "model": "trainer/model/Format-Serving",
    "exports_table": "exporter/exports/exports.json",
    "benchmark": "exporter/exports/benchmark.md",
}
CONFIG_FILE = ARTIFACT_FILES["config"]
HISTORY_PATH = ARTIFACT_FILES["history"]
FOLD_HISTORIES = "trainer/fold-*/model_run/" + Path(HISTORY_PATH).name  # a k-fold run's trainer folders
MISSING = "-"
# The per-class maps a metrics section holds; shown as `<section>.<short>.<class>`.
PER_CLASS = {"per_class_iou": "iou"}
# Whole-image numbers of a metrics section worth a row, when present.
HEADLINE = ("mean_iou", "mean_iou_fold_mean", "mean_iou_fold_std", "pixel_accuracy", "frequency_weighted_iou", "boundary_f1")


class AnalyzeError(ValueError):
    pass


@dataclass(frozen=True)
class Run:
    path: Path
    label: str
    config: dict[str, Any]
    summary: dict[str, Any]
    history: dict[str, list[float]] = field(default_factory=dict)


def is_run(path: Path) -> bool:
    return (path / SUMMARY_FILE).is_file() and (path / CONFIG_FILE).is_file()


def find_runs(locations: list[str | Path]) -> list[Path]:
    """Each location is a run folder or a folder holding run folders (one level down)."""
    found: list[Path] = []
    for location in map(Path, locations):
        if is_run(location):
            found.append(location)
            continue
        if not location.is_dir():
            raise AnalyzeError(f"{location}: no such folder")
        children = [child for child in sorted(location.iterdir()) if child.is_dir() and is_run(child)]
        if not children:
            raise AnalyzeError(f"{location}: neither a run folder ({SUMMARY_FILE} and {CONFIG_FILE}) nor a folder of run folders")
        found.extend(children)
    unique = list(dict.fromkeys(path.resolve() for path in found))
    if not unique:
        raise AnalyzeError("no run folders given")
    return unique


def read_history(path: Path) -> dict[str, list[float]]:
    """history.csv as columns (one value per epoch); empty when the run has none."""
    if not path.is_file():
        return {}
    with path.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            columns.setdefault(key, []).append(float(value) if value not in ("", None) else math.nan)
    return columns


def run_history(run_dir: Path) -> dict[str, list[float]]:
    """The trainer's history; for a k-fold run the folds' histories averaged epoch by epoch
    (over the folds that reached the epoch)."""
    single = read_history(run_dir / HISTORY_PATH)
    folds = [read_history(path) for path in sorted(run_dir.glob(FOLD_HISTORIES))]
    if single or not folds:
        return single
    columns = list(dict.fromkeys(key for fold in folds for key in fold))
    epochs = max(len(values) for fold in folds for values in fold.values())
    averaged = {key: [_mean([fold[key][epoch] for fold in folds if epoch < len(fold.get(key, []))]) for epoch in range(epochs)] for key in columns}
    return {key: [math.nan if value is None else value for value in values] for key, values in averaged.items()}


def _labels(paths: list[Path]) -> list[str]:
    """Folder names, or parent/name where two runs share a name."""
    names = [path.name for path in paths]
    return [f"{path.parent.name}/{path.name}" if names.count(path.name) > 1 else path.name for path in paths]


def load_runs(locations: list[str | Path]) -> list[Run]:
    paths = find_runs(locations)
    return [
        Run(
            path=path,
            label=label,
            config=yaml.safe_load((path / CONFIG_FILE).read_text()) or {},
            summary=json.loads((path / SUMMARY_FILE).read_text()),
            history=run_history(path),
        )
        for path, label in zip(paths, _labels(paths))
    ]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key paths to leaves. Lists of mappings (`stages`) are indexed (`stages.0.epochs`);
    other lists (`shape`, `classes`) are one value, compared whole."""
    if isinstance(value, dict):
        if not value and prefix:
            return {prefix: value}
        flat: dict[str, Any] = {}
        for key, child in value.items():
            flat.update(flatten(child, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        flat = {}
        for index, child in enumerate(value):
            flat.update(flatten(child, f"{prefix}.{index}"))
        return flat
    return {prefix: value}


def config_diff(runs: list[Run]) -> dict[str, list[Any]]:
    """Keys whose values are not the same in every run, in first-seen order; each with one
    value per run, MISSING where a run lacks the key. A lacking key equals null: that is how
    an optional key added after an older run shows (`qat: null` beside `qat.epochs: 2`
    differs at `qat.epochs` only)."""
    flats = [flatten(run.config) for run in runs]
    keys = list(dict.fromkeys(key for flat in flats for key in flat))
    diff = {}
    for key in keys:
        values = [flat.get(key) for flat in flats]
        if any(value != values[0] for value in values[1:]):
            diff[key] = [flat.get(key, MISSING) for flat in flats]
    return diff


def _mean(values: list[float]) -> float | None:
    numbers = [value for value in values if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)]
    return sum(numbers) / len(numbers) if numbers else None


def average_folds(sections: list[dict[str, Any]]) -> dict[str, Any]:
    """One metrics section from several folds: the mean of each number and of each per-class
    number (a fold lacking a class, or holding None for it, does not count for it)."""
    averaged: dict[str, Any] = {"folds": len(sections)}
    for name in HEADLINE:
        mean = _mean([section.get(name) for section in sections])
        if mean is not None:
            averaged[name] = mean
    for name in PER_CLASS:
        classes = list(dict.fromkeys(key for section in sections for key in section.get(name) or {}))
        if classes:
            averaged[name] = {key: _mean([(section.get(name) or {}).get(key) for section in sections]) for key in classes}
    return averaged


def metric_sections(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`eval`, `test`, ... sections of a summary's metrics. A section may be one mapping or a
    list of per-fold mappings; `metrics.folds` may be a list of {section: mapping}. Per-fold
    sections are averaged, unless the summary also has the section itself (a k-fold run's
    pooled out-of-fold metrics), which is kept and counts the folds."""
    metrics = summary.get("metrics") or {}
    per_fold: dict[str, list[dict[str, Any]]] = {}
    for fold in metrics.get("folds") or []:
        for name, section in fold.items():
            if isinstance(section, dict):
                per_fold.setdefault(name, []).append(section)
    sections: dict[str, dict[str, Any]] = {}
    for name, section in metrics.items():
        if isinstance(section, dict):
            sections[name] = section
        elif isinstance(section, list) and name != "folds":
            per_fold.setdefault(name, []).extend(item for item in section if isinstance(item, dict))
    for name, folds in per_fold.items():
        if folds:
            sections[name] = {**sections[name], "folds": len(folds)} if name in sections else average_folds(folds)
    return sections


def run_metrics(run: Run) -> dict[str, float | None]:
    """Flat `<section>.<metric>` numbers of a run (eval first), `<section>.iou.<class>` per class."""
    flat: dict[str, float | None] = {}
    sections = metric_sections(run.summary)
    for name in sorted(sections, key=lambda section: (section != "eval", section != "test", section)):
        section = sections[name]
        if "folds" in section:
            flat[f"{name}.folds"] = section["folds"]
        for key in HEADLINE:
            if isinstance(section.get(key), (int, float)):
                flat[f"{name}.{key}"] = section[key]
        for key, short in PER_CLASS.items():
            for label, value in (section.get(key) or {}).items():
                flat[f"{name}.{short}.{label}"] = value
    return flat


def run_facts(run: Run) -> dict[str, Any]:
    """What a run is besides its config and scores: status, data, length, time."""
    history_epochs = len(next(iter(run.history.values()), []))
    fingerprint = run.summary.get("data_fingerprint")
    return {
        "status": run.summary.get("status", MISSING),
        "blessed": run.summary.get("blessed", MISSING),
        "data": fingerprint[:12] if isinstance(fingerprint, str) else MISSING,
        "epochs": history_epochs or MISSING,
        "seconds": run.summary.get("seconds", MISSING),
    }


def metric_key(metric: str, names: list[str]) -> str:
    """A full `<section>.<metric>` name as given (`test.mean_iou`, `eval.iou.circle`);
    anything else names an eval metric (`mean_iou`, `iou.circle`)."""
    return metric if metric in names else f"eval.{metric}"


@dataclass(frozen=True)
class Comparison:
    runs: list[Run]  # best first by the primary metric; runs without it last
    metric: str
    diff: dict[str, list[Any]]
    metrics: dict[str, list[float | None]]
    facts: dict[str, list[Any]]


def compare(runs: list[Run], metric: str = "mean_iou") -> Comparison:
    scored = [(run, run_metrics(run)) for run in runs]
    key = metric_key(metric, [name for _, flat in scored for name in flat])
    scored.sort(key=lambda pair: (not isinstance(pair[1].get(key), (int, float)), -(pair[1].get(key) or 0.0)))
    ordered = [run for run, _ in scored]
    names = list(dict.fromkeys(name for _, flat in scored for name in flat))
    if key in names:
        names.remove(key)
        names.insert(0, key)
    facts_by_run = [run_facts(run) for run in ordered]
    facts = {name: [facts[name] for facts in facts_by_run] for name in facts_by_run[0]} if facts_by_run else {}
    return Comparison(
        runs=ordered,
        metric=key,
        diff=config_diff(ordered),
        metrics={name: [flat.get(name) for _, flat in scored] for name in names},
        facts=facts,
    )


def _value(value: Any) -> str:
    """A config value or fact as YAML would show it (`null`, `0.001`, `[1,2]`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _score(value: float | None) -> str:
    return MISSING if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = [title, "  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    lines.extend("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
    return "\n".join(lines)


def _rows(values: dict[str, list[Any]], show: Any = _value) -> list[list[str]]:
    return [[name, *(cell if cell is MISSING else show(cell) for cell in cells)] for name, cells in values.items()]


def console(comparison: Comparison) -> str:
    header = ["", *(run.label for run in comparison.runs)]
    diff = _rows(comparison.diff) if comparison.diff else [["(none: the configs are the same)", *([""] * len(comparison.runs))]]
    parts = [
        f"{len(comparison.runs)} runs, best {comparison.metric} first",
        _table("config keys that differ", header, diff),
        _table("metrics", header, _rows(comparison.metrics, _score)),
        _table("runs", header, _rows(comparison.facts)),
    ]
    return "\n\n".join(parts) + "\n"


def write_csv(comparison: Comparison, path: str | Path) -> None:
    """One row per run, best first: where it is, its metrics and facts, then its values of
    the differing config keys (prefixed `config.`)."""
    header = ["run", "path", *comparison.metrics, *comparison.facts, *(f"config.{key}" for key in comparison.diff)]
    with Path(path).open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        for index, run in enumerate(comparison.runs):
            metrics = ["" if values[index] is None else values[index] for values in comparison.metrics.values()]
            others = [values[index] for values in (*comparison.facts.values(), *comparison.diff.values())]
            writer.writerow([run.label, str(run.path), *metrics, *("" if cell is MISSING else _value(cell) for cell in others)])


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def per_class_plot(comparison: Comparison) -> str | None:
    """Base64 PNG: per-class IoU bars of the runs side by side, one panel per metrics section."""
    from matplotlib.figure import Figure

    sections = list(dict.fromkeys(name.split(".")[0] for name in comparison.metrics if ".iou." in name))
    if not sections:
        return None
    figure = Figure(figsize=(max(6.0, 1.2 * len(comparison.runs) + 4.0), 3.6 * len(sections)))
    for row, section in enumerate(sections, start=1):
        axes = figure.add_subplot(len(sections), 1, row)
        prefix = f"{section}.iou."
        classes = [name[len(prefix):] for name in comparison.metrics if name.startswith(prefix)]
        width = 0.8 / len(comparison.runs)
        for index, run in enumerate(comparison.runs):
            heights = [comparison.metrics[prefix + label][index] for label in classes]
            positions = [position + index * width for position in range(len(classes))]
            axes.bar(positions, [math.nan if value is None else value for value in heights], width, label=run.label)
        axes.set_xticks([position + 0.4 - width / 2 for position in range(len(classes))], classes)
        axes.set_ylim(0, 1)
        axes.set_ylabel(f"{section} IoU")
        axes.legend(fontsize="small")
    return _png(figure)


def curves_plot(comparison: Comparison) -> str | None:
    """Base64 PNG: the runs' training curves overlaid (loss, mean IoU; train dashed, eval solid)."""
    from matplotlib.figure import Figure

    with_history = [run for run in comparison.runs if run.history]
    if not with_history:
        return None
    figure = Figure(figsize=(11, 4))
    for column, metric in enumerate(("loss", "mean_iou"), start=1):
        axes = figure.add_subplot(1, 2, column)
        for index, run in enumerate(with_history):
            colour = f"C{index % 10}"
            for key, style in ((metric, "--"), (f"val_{metric}", "-")):
                if key in run.history:
                    epochs = range(1, len(run.history[key]) + 1)
                    axes.plot(epochs, run.history[key], style, color=colour, label=f"{run.label} {'eval' if key.startswith('val_') else 'train'}")
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)
        axes.legend(fontsize="x-small")
    return _png(figure)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(comparison: Comparison, path: str | Path) -> None:
    """One page, no external files: tables, and the plots as base64 PNGs."""
    header = ["", *(run.label for run in comparison.runs)]
    sections = [
        f"<h1>segflow analyze: {len(comparison.runs)} runs</h1>",
        f"<p>Best {html.escape(comparison.metric)} first. Folders: "
        + ", ".join(f"<code>{html.escape(str(run.path))}</code>" for run in comparison.runs) + "</p>",
        "<h2>Config keys that differ</h2>",
        _html_table(header, _rows(comparison.diff)) if comparison.diff else "<p>None: the configs are the same.</p>",
        "<h2>Metrics</h2>",
        _html_table(header, _rows(comparison.metrics, _score)),
        "<h2>Runs</h2>",
        _html_table(header, _rows(comparison.facts)),
    ]
    for title, image in (("Per-class IoU", per_class_plot(comparison)), ("Training curves", curves_plot(comparison))):
        if image is not None:
            sections.append(f'<h2>{title}</h2><img alt="{title}" src="data:image/png;base64,{image}">')
    style = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    page = f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>segflow analyze</title><style>{style}</style></head><body>{''.join(sections)}</body></html>\n"
    Path(path).write_text(page)
