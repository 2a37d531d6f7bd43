"""The architecture as a test: import-linter's contracts in pyproject.toml ([tool.importlinter]).

The layers (reference > cli > api > pipelines > components > cluster > train > evaluate > export > config >
model > data > utils > console) may import downwards only, and no sibling modules or packages
import each other in a cycle. A change that breaks either fails here with the offending imports.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_every_import_contract_is_kept() -> None:
    done = subprocess.run([str(LINT_IMPORTS), "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in done.stdout


def test_the_layers_name_every_subpackage_of_segflow() -> None:
    """A new subpackage or top-level module must take a place in the layers, or nothing checks it."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(contract["layers"] for contract in contracts if contract["type"] == "layers")
    layered = {name.strip() for line in layers for name in line.split("|")}
    package = REPO / "segflow"
    present = {f"segflow.{path.stem}" for path in package.glob("*.py") if path.stem != "__init__"}
    present |= {f"segflow.{path.name}" for path in package.iterdir() if (path / "__init__.py").exists()}
    assert present == layered
