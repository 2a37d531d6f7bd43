"""RetrainGate: train only when there is something new since the version that serves.

A scheduled run reads the same folders night after night. When the dataset's fingerprint
(DatasetFingerprint: every file's name, size and modification time) and the resolved
config's hash equal those recorded in the lineage of the registry's `current` version, a new
model would be trained on the same data with the same settings: the gate says no, the DAG
skips everything after it, and the run ends in seconds with status `skipped`. `force` (the
pipeline parameter; `segflow run --force`) trains anyway.
"""
from __future__ import annotations

import os
from typing import Any

from segflow.config.experiment import ExperimentConfig
from segflow.utils.io import atomic_dir, read_json, write_json
from segflow.utils.runtime import log

DECISION_FILE = "decision.json"


def decide(config: ExperimentConfig, config_hash: str, dataset_fingerprint: str, force: bool) -> dict[str, Any]:
    """{"train": bool, "reason": one line, "current": the current version or None}."""
    from segflow.export.model_registry import read_aliases, read_lineage

    current = read_aliases(config.push.registry, config.name).current
    if force:
        return {"train": True, "reason": "forced (--force)", "current": current}
    if current is None:
        return {"train": True, "reason": f"no current version of {config.name!r} in {config.push.registry}", "current": None}
    lineage = read_lineage(config.push.registry, config.name, current)
    if lineage is None:
        return {"train": True, "reason": f"version {current} recorded no lineage to compare with", "current": current}
    new_data = lineage.get("dataset_fingerprint") != dataset_fingerprint
    new_config = lineage.get("config_hash") != config_hash
    if not (new_data or new_config):
        return {"train": False, "reason": f"no new data since version {current} (same files, same config)", "current": current}
    changed = " and ".join(what for what, differs in (("new data", new_data), ("a changed config", new_config)) if differs)
    return {"train": True, "reason": f"{changed} since version {current}", "current": current}


def run(config: ExperimentConfig, decision_dir: str | os.PathLike[str], config_hash: str, dataset_fingerprint: str, force: bool = False) -> bool:
    """Write decision.json; return whether to train."""
    decision = decide(config, config_hash, dataset_fingerprint, force)
    with atomic_dir(decision_dir) as out:
        write_json(out / DECISION_FILE, decision)
    log(f"retrain_gate: {'train' if decision['train'] else 'skip'}: {decision['reason']}")
    return bool(decision["train"])


def read_decision(decision_dir: str | os.PathLike[str]) -> dict[str, Any]:
    return read_json(os.path.join(decision_dir, DECISION_FILE))
