"""Pusher: publish a blessed model's exports as a new version in a model registry.

The registry itself (layout, commit markers, safe concurrent pushes) is segflow.export.model_registry.

Only exports that passed the Exporter's parity gate are published; failed and skipped ones
are listed in push.json under `withheld` with their reasons.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from segflow.config.experiment import ExperimentConfig
from segflow.export.model_registry import publish
from segflow.utils import storage
from segflow.utils.io import atomic_dir, write_json
from segflow.utils.runtime import log

PUSH_FILE = "push.json"


def stage_passed_exports(exports_dir: str | os.PathLike[str], staging: Path) -> tuple[list[str], dict[str, str]]:
    """Copy into `staging` the exports that passed the parity gate with their sidecar JSON (and
    ai-edge-quantizer's report, which the sidecar names) and an exports.json of only them;
    return (their names, {withheld name: reason})."""
    from segflow.components.exporter.core import read_exports
    from segflow.export.exporters import EXPORTS_FILE

    exports = read_exports(exports_dir)
    passed = {name: entry for name, entry in exports.items() if entry["status"] == "passed"}
    for entry in passed.values():
        source = Path(exports_dir) / entry["file"]
        if source.is_dir():
            shutil.copytree(source, staging / entry["file"])
        else:
            shutil.copy2(source, staging / entry["file"])
        for key in ("sidecar", "quantizer_report"):
            if key in entry:
                shutil.copy2(Path(exports_dir) / entry[key], staging / entry[key])
    write_json(staging / EXPORTS_FILE, passed)
    withheld = {name: f"{entry['status']}: {entry['reason']}" for name, entry in exports.items() if name not in passed}
    return list(passed), withheld


def run(
    config: ExperimentConfig,
    exports_dir: str | os.PathLike[str],
    blessing_dir: str | os.PathLike[str],
    push_dir: str | os.PathLike[str],
) -> dict[str, Any]:
    from segflow.evaluate.evaluation import is_blessed, read_blessing

    record: dict[str, Any]
    if not is_blessed(blessing_dir):
        blessing = read_blessing(blessing_dir)
        failed = ", ".join(blessing["failed"]) if blessing is not None else "see the blessing"
        record = {"pushed": False, "reason": f"model not blessed (failed: {failed})"}
    else:
        with tempfile.TemporaryDirectory(prefix="segflow-push-") as staging:
            passed, withheld = stage_passed_exports(exports_dir, Path(staging))
            for export, reason in withheld.items():
                log(f"pusher: {export} withheld: {reason}")
            if not passed:
                record = {"pushed": False, "reason": "no export passed the parity gate", "withheld": withheld}
            else:
                target = publish(staging, config.push.registry, config.name, origin=os.fspath(exports_dir))
                record = {"pushed": True, "destination": target, "version": int(storage.basename(target)), "exports": passed, "withheld": withheld}
    if record["pushed"]:
        log(f"pusher: published version {record['version']} ({', '.join(record['exports'])}) to {record['destination']}")
    else:
        log(f"pusher: nothing pushed: {record['reason']}")
    with atomic_dir(push_dir) as out:
        write_json(out / PUSH_FILE, record)
    return record
