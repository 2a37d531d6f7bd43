"""The documentation's reference pages cannot drift from the code: every command, option, config
key and API function appears in what `make docs` generates (segflow.reference)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Iterator

from segflow import api
from segflow.cli import build_parser
from segflow.config.experiment import config_schema
from segflow.reference import PAGES, api_reference, cli_reference, config_reference, write_reference

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference"


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction))


def test_every_command_and_option_is_in_the_cli_reference() -> None:
    page = cli_reference()
    for name, command in _commands(build_parser()).items():
        section = page.split(f"\n## segflow {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in (action for action in command._actions if not isinstance(action, argparse._HelpAction)):
            for option in action.option_strings:
                assert f"`{option}`" in section, f"segflow {name} {option}"
            if not action.option_strings:
                assert f"`{action.metavar or action.dest}`" in section, f"segflow {name} {action.dest}"


def _schema_keys(schema: dict[str, Any], node: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Key paths read from the JSON Schema (a source independent of the reference's own walk)."""
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    for option in node.get("anyOf", []):
        yield from _schema_keys(schema, option, prefix)
    if node.get("type") == "array" and "items" in node and prefix:
        yield from _schema_keys(schema, node["items"], prefix.removesuffix(".") + "[].")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _schema_keys(schema, node["additionalProperties"], prefix + "<name>.")
    for key, child in node.get("properties", {}).items():
        yield prefix + key
        yield from _schema_keys(schema, child, f"{prefix}{key}.")


def test_every_config_key_is_in_the_config_reference() -> None:
    schema = config_schema()
    keys = set(_schema_keys(schema, schema))
    rows = {line.split("`")[1] for line in config_reference().splitlines() if line.startswith("| `")}
    assert len(keys) > 150 and keys == rows, (sorted(keys - rows), sorted(rows - keys))


def test_every_api_function_is_in_the_python_api_reference() -> None:
    page = api_reference()
    for name in api.__all__:
        assert f"## segflow.api.{name}\n" in page
        assert (getattr(api, name).__doc__ or "").strip(), f"segflow.api.{name} has no docstring"


def test_the_checked_in_reference_pages_are_what_the_code_generates() -> None:
    """docs/reference/{cli,config,python-api}.md as committed (SEGFLOW_UPDATE_GOLDEN=1 rewrites them)."""
    if os.environ.get("SEGFLOW_UPDATE_GOLDEN"):
        write_reference(REFERENCE)
    stale = [name for name, page in PAGES.items() if (REFERENCE / name).read_text() != page()]
    assert not stale, f"docs/reference/{stale} differ from the code: run `make golden` (or make docs)"
