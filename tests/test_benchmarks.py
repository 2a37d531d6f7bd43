"""Every script in benchmarks/ runs in its smoke mode, so none can rot unnoticed (issue 22:
input_pipeline.py crashed for days on a changed decode signature, and nothing ran it).

Each runs as its own process, as a user runs it: `--smoke` (the same code on the smallest
settings) and `--output FILE`, on the tests' tiny trained run where it needs data. A new script
without those flags or without an entry in SMOKES fails here. In `make test-extended`, which CI
runs after `make test`."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))
KeyPath = tuple[str, ...]


@dataclass(frozen=True)
class Smoke:
    """One benchmark's smoke run: its arguments ("{run}": the tiny trained run's folder,
    "{config}": that run's config as YAML), the key paths of its JSON that must hold positive
    numbers ("*": every key at that level) and any other values it must report."""

    arguments: tuple[str, ...]
    figures: tuple[KeyPath, ...]
    expected: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_run(self) -> bool:
        return any("{" in argument for argument in self.arguments)


SMOKES = {
    "example_gen_modes": Smoke((), (("median_seconds", "*"), ("ratio_to_in_memory", "*"))),
    "evaluator_beam": Smoke(
        ("{run}", "--config", "{config}"), (("median_seconds", "*"), ("ratio_beam_to_loop",)), {"same_confusion_matrix": True}
    ),
    # Two quantizers: the script's own comparison table (_compare), not only the library's benchmark().
    "export_latency": Smoke(
        ("--model", "{run}/model", "--examples", "{run}/examples", "--quantizers", "converter,ai_edge_quantizer"),
        (("formats", "*", "latency", "*", "median_ms"), ("formats", "tflite_dynamic (ai_edge_quantizer)", "latency", "*", "vs_tflite_fp32")),
    ),
    "input_pipeline": Smoke(("--config", "{config}", "--workdir", "{run}"), (("images_per_second", "*"), ("ratios", "*"))),
    "trainer_throughput": Smoke(("{config}", "--workdir", "{run}"), (("median_steps_per_second", "*"), ("ratio_pipeline_to_bare",))),
}


def values_at(tree: Any, path: KeyPath) -> list[Any]:
    """The values at `path` in parsed JSON, "*" standing for every key at its level."""
    if not path:
        return [tree]
    keys = list(tree) if path[0] == "*" else [path[0]]
    return [value for key in keys for value in values_at(tree[key], path[1:])]


def test_every_smoke_names_a_script() -> None:
    """A removed benchmark must not leave its entry behind (a new one fails its own smoke test)."""
    assert set(SMOKES) <= {script.stem for script in SCRIPTS}


@pytest.mark.extended  # about 4 minutes on 2 cores: beyond the default suite's 15, and CI runs make test-extended
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.stem)
def test_benchmark_smoke_mode(script: Path, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The script exits 0 in its smoke mode and writes the JSON it promises, with its figures."""
    smoke = SMOKES.get(script.stem)
    assert smoke is not None, f"{script.name}: give it --smoke and --output, and an entry in SMOKES here"
    places: dict[str, str] = {}
    if smoke.needs_run:  # built once per session and shared with other tests; the benchmarks only read it
        trained = request.getfixturevalue("trained")
        (tmp_path / "config.yaml").write_text(trained["config"].to_yaml())
        places = {"run": str(trained["root"]), "config": str(tmp_path / "config.yaml")}
    output = tmp_path / "result.json"
    command = [sys.executable, str(script), *(argument.format(**places) for argument in smoke.arguments), "--smoke", "--output", str(output)]
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, f"{' '.join(command)} exited {completed.returncode}:\n{completed.stderr[-5000:]}"
    result = json.loads(output.read_text())
    assert {"benchmark": script.stem, "smoke": True, **smoke.expected}.items() <= result.items()
    for path in smoke.figures:
        figures = values_at(result, path)
        assert figures, f"nothing at {path}"
        for figure in figures:
            assert isinstance(figure, (int, float)) and not isinstance(figure, bool) and math.isfinite(figure) and figure > 0, (path, figure)
