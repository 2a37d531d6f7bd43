"""Pusher: publish a blessed model's exports as a new version in a model registry, with its
lineage, and make it `current`.

The registry itself (layout, commit markers, aliases, safe concurrent pushes) is
segflow.export.model_registry.

Only exports that passed the Exporter's parity gate are published; failed and skipped ones
are listed in push.json under `withheld` with their reasons. With them goes the trained
network (`network/`: weights and recipe) that `stages[].initial_weights: current` starts
from, and the data statistics (statistics.json) that `validation.baseline_statistics: current`
compares new data with. Each version carries
lineage.json: what it was trained on (data fingerprints, example counts per split), with
which settings (config hash) and code (segflow version, git commit), its metrics and
blessing, and the run it came from. The pushed version becomes `current` only if `current`
is still the version the Evaluator compared it with: a run that was compared with version 1
while another run made version 2 current is published but does not serve (push.json says
why). Without a change threshold nothing was compared, and the latest blessed push serves.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from segflow.config.experiment import ExperimentConfig
from segflow.data.examples import STATISTICS_FILE
from segflow.export.model_registry import ANY_CURRENT, LINEAGE_FILE, AliasMoved, move_current, publish
from segflow.train.warm_start import NETWORK_FOLDER, NETWORK_RECIPE
from segflow.utils import storage
from segflow.utils.io import atomic_dir, read_json, write_json
from segflow.utils.runtime import log

PUSH_FILE = "push.json"
# Set by the local runner: the run folder the exports will be in once the run ends (kfp.local
# writes them under a scratch root first). Elsewhere lineage names the exports artifact itself.
RUN_FOLDER_ENV = "SEGFLOW_RUN_FOLDER"


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


def lineage(
    config: ExperimentConfig, examples_dir: str | os.PathLike[str], evaluation_dir: str | os.PathLike[str], blessing_dir: str | os.PathLike[str],
    exports_dir: str | os.PathLike[str], config_hash: str, dataset_fingerprint: str, parent: int | None,
) -> dict[str, Any]:
    """lineage.json of the version about to be published; `parent`: the version it was warm-started from."""
    from segflow.components.evaluator.core import read_metrics
    from segflow.data.examples import read_counts, read_fingerprint
    from segflow.evaluate.evaluation import read_blessing
    from segflow.evaluate.tracking import source_revision, versions

    return {
        "name": config.name,
        "config_hash": config_hash,
        "dataset_fingerprint": dataset_fingerprint,
        "examples_fingerprint": read_fingerprint(examples_dir)["sha256"],
        "counts": read_counts(examples_dir),
        "parent": parent,
        "metrics": read_metrics(evaluation_dir),
        "blessing": read_blessing(blessing_dir),
        "source": {"segflow": versions()["segflow"], **source_revision()},
        "run": os.environ.get(RUN_FOLDER_ENV) or os.fspath(exports_dir),
    }


def expected_current(config: ExperimentConfig, blessing_dir: str | os.PathLike[str]) -> int | None:
    """The version `current` must still be for this push to replace it: the one the Evaluator
    compared the candidate with (None: there was none); ANY_CURRENT without a change threshold."""
    from segflow.evaluate.evaluation import read_blessing

    blessing = read_blessing(blessing_dir)
    if config.evaluation.change_thresholds.max_mean_iou_drop is None or blessing is None or blessing.get("baseline") is None:
        return ANY_CURRENT
    version = blessing["baseline"]["version"]
    return None if version is None else int(version)


def run(
    config: ExperimentConfig,
    exports_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    statistics_dir: str | os.PathLike[str],
    blessing_dir: str | os.PathLike[str],
    examples_dir: str | os.PathLike[str],
    evaluation_dir: str | os.PathLike[str],
    push_dir: str | os.PathLike[str],
    config_hash: str,
    dataset_fingerprint: str,
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
                network = Path(staging) / NETWORK_FOLDER
                shutil.copytree(Path(model_dir) / NETWORK_FOLDER, network)  # what `initial_weights: current` starts from
                parent = read_json(network / NETWORK_RECIPE)["parent"]
                shutil.copy2(Path(statistics_dir) / STATISTICS_FILE, Path(staging) / STATISTICS_FILE)  # what `baseline_statistics: current` checks drift against
                write_json(Path(staging) / LINEAGE_FILE, lineage(config, examples_dir, evaluation_dir, blessing_dir, exports_dir, config_hash, dataset_fingerprint, parent))
                target = publish(staging, config.push.registry, config.name, origin=os.fspath(exports_dir))
                record = {"pushed": True, "destination": target, "version": int(storage.basename(target)), "exports": passed, "withheld": withheld}
    if record["pushed"]:
        log(f"pusher: published version {record['version']} ({', '.join(record['exports'])}) to {record['destination']}")
        record.update(promote(config, record["version"], blessing_dir, exports_dir))
    else:
        log(f"pusher: nothing pushed: {record['reason']}")
    with atomic_dir(push_dir) as out:
        write_json(out / PUSH_FILE, record)
    return record


def promote(config: ExperimentConfig, version: int, blessing_dir: str | os.PathLike[str], exports_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Move `current` to the pushed version when the comparison still holds; push.json's
    `current` (true or false) and `current_reason`."""
    expected = expected_current(config, blessing_dir)
    reason = "blessed push" if expected == ANY_CURRENT else f"blessed against version {expected}" if expected is not None else "blessed, first version"
    try:
        aliases = move_current(config.push.registry, config.name, version, expected=expected, by=f"push from {os.fspath(exports_dir)}", reason=reason)
    except AliasMoved as moved:
        log(f"pusher: version {version} is not current: {moved}")
        return {"current": False, "current_reason": f"compared with version {expected}, but {moved}"}
    log(f"pusher: version {version} is now current (previous: {aliases.previous})")
    return {"current": True, "previous": aliases.previous}
