"""`segflow report`: every section on a real run folder, embedded PNGs that decode, and a
page (not a crash) for a run that lacks a component's output."""
from __future__ import annotations

import base64
import io
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from segflow.cli import main
from segflow.utils.io import write_json
from segflow.pipelines.local import build_summary
from segflow.evaluate.analyze import SUMMARY_FILE
from segflow.evaluate.report import SECTIONS, build_report
from segflow.utils.runtime import execute

DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def run_dir(trained: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder laid out as `segflow run` leaves it: the session's trained model and data
    artifacts linked in, the validator, evaluator and exporter cores run into it (a quick
    stand-in for the whole DAG, which takes minutes)."""
    from segflow.components.evaluator import core as evaluator
    from segflow.components.example_validator import core as example_validator
    from segflow.components.exporter import core as exporter

    run = tmp_path_factory.mktemp("report") / "run"
    for artifact, name in (("example_gen/examples", "examples"), ("statistics_gen/statistics", "statistics"), ("schema_gen/schema", "schema"),
                           ("transform/transform_graph", "transform"), ("trainer/model", "model"), ("trainer/model_run", "model_run")):
        (run / artifact).parent.mkdir(parents=True, exist_ok=True)
        (run / artifact).symlink_to(trained[name])
    config = trained["config"]
    config = config.model_copy(update={"export": config.export.model_copy(update={"formats": ["saved_model", "tflite_fp32"]})})
    execute("example_validator", run / "example_validator", example_validator.run, config, run / "statistics_gen/statistics", run / "schema_gen/schema",
            run / "example_validator/anomalies")
    execute("evaluator", run / "evaluator", evaluator.run, config, run / "example_gen/examples", run / "trainer/model", run / "evaluator/evaluation",
            run / "evaluator/blessing")
    execute("exporter", run / "exporter", exporter.run, config, run / "example_gen/examples", run / "trainer/model", run / "exporter/exports")
    (run / "config.yaml").write_text(config.to_yaml())
    write_json(run / SUMMARY_FILE, build_summary(run, config, "train", 1.0))
    return run


def _sections(page: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([a-z-]+)">(.*?)</section>', page, re.S))


def _check_pngs(page: str) -> int:
    """Every embedded picture is a PNG of a sane size; returns how many there are."""
    encoded = DATA_URI.findall(page)
    for data in encoded:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            image.load()
            assert image.format == "PNG"
            assert 16 <= min(image.size) and max(image.size) <= 3000, image.size
    return len(encoded)


def test_every_section_is_filled_and_the_page_is_self_contained(run_dir: Path) -> None:
    page = build_report(run_dir, worst=2, samples=3)
    sections = _sections(page)
    assert list(sections) == [anchor for anchor, _, _ in SECTIONS]
    assert "not available" not in page
    assert not re.search(r'(src|href)="(?!data:image/png;base64,|#)', page)  # nothing outside the page
    assert "http://" not in page and "https://" not in page
    # image, truth, prediction, errors per example, and the matplotlib figures in their sections
    assert sections["samples"].count("<figure>") == 4 * 3 and sections["worst"].count("<figure>") == 4 * 2
    for anchor in ("training", "class-iou", "confusion", "data"):
        assert 'class="plot"' in sections[anchor], anchor
    assert _check_pngs(page) == 4 * (3 + 2) + 4
    assert "saved_model" in sections["exports"] and "tflite_fp32" in sections["exports"]
    assert "Overall" in sections["slices"] and "BLESSED" in sections["summary"]


def test_missing_outputs_give_not_available_lines(run_dir: Path, tmp_path: Path) -> None:
    """A run without its exporter, per-image metrics or statistics still gets every section."""
    partial = tmp_path / "run"
    shutil.copytree(run_dir, partial, symlinks=True, ignore=shutil.ignore_patterns("exporter", "per_image.jsonl"))
    (partial / "statistics_gen" / "statistics").unlink()
    page = build_report(partial, worst=2, samples=1)
    sections = _sections(page)
    assert list(sections) == [anchor for anchor, _, _ in SECTIONS]
    assert "not available: the run has no exporter/exports" in sections["exports"]
    assert "not available: the run has no evaluator/evaluation/Split-eval/per_image.jsonl" in sections["worst"]
    assert "not available: the run has no statistics_gen/statistics/statistics.json" in sections["data"]
    assert "not available" not in sections["samples"] + sections["confusion"]
    _check_pngs(page)


def test_cli_writes_the_page_into_the_run_folder(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(run_dir), "--worst", "1", "--samples", "0"]) == 0
    written = run_dir / "report.html"
    assert capsys.readouterr().out.strip() == f"wrote {written.resolve()}"
    sections = _sections(written.read_text())
    assert "not available: --samples 0" in sections["samples"] and sections["worst"].count("<figure>") == 4
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "no such run folder" in capsys.readouterr().err
