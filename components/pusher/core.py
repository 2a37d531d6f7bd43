"""Pusher: publish a blessed model's exports as a new version in a model registry folder.

Layout `<registry>/<name>/<version>/`, versions 1, 2, 3...; a version is assembled in a
hidden temporary folder and renamed into place, so it appears whole or not at all and
an existing version is never overwritten (rename fails onto a non-empty folder).
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from segflow.config import ExperimentConfig
from segflow.io import atomic_dir, write_json
from segflow.runtime import log

PUSH_FILE = "push.json"


def next_version(model_root: Path) -> int:
    versions = [int(path.name) for path in model_root.iterdir() if path.name.isdigit()] if model_root.exists() else []
    return max(versions, default=0) + 1


def publish(source: Path, model_root: Path) -> Path:
    model_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".push-", dir=model_root))
    try:
        shutil.copytree(source, staging / "payload")
        (staging / "payload").chmod(0o755)
        while True:
            target = model_root / str(next_version(model_root))
            try:
                os.rename(staging / "payload", target)
                return target
            except OSError as error:  # another pusher took this version first
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run(
    config: ExperimentConfig,
    exports_dir: str | os.PathLike[str],
    blessing_dir: str | os.PathLike[str],
    push_dir: str | os.PathLike[str],
) -> dict[str, Any]:
    from segflow.components.evaluator.core import is_blessed

    if is_blessed(blessing_dir):
        target = publish(Path(exports_dir), Path(config.push.registry) / config.name)
        record = {"pushed": True, "destination": str(target), "version": int(target.name)}
        log(f"pusher: published version {target.name} to {target}")
    else:
        record = {"pushed": False, "reason": f"model not blessed (eval mean IoU below evaluation.min_mean_iou {config.evaluation.min_mean_iou})"}
        log(f"pusher: nothing pushed: {record['reason']}")
    with atomic_dir(push_dir) as out:
        write_json(out / PUSH_FILE, record)
    return record
