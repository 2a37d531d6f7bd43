"""The model registry: versions of a model under `<registry>/<name>/<version>/`, in a local
folder or a `gs://` / `s3://` URI. The Pusher publishes into it; the Evaluator reads its latest
version as the baseline. A version exists for readers only once its commit marker
`_COMMITTED` (a JSON record of the version and its files) is in it:

- local folder: the version, marker included, is assembled in a hidden temporary folder and
  renamed into place, so it appears whole or not at all, and an existing version is never
  overwritten (rename fails onto a non-empty folder);
- object store (no rename): the number is claimed by an exclusive write of `_CLAIM`, the
  payload is uploaded under `<version>/`, and `_COMMITTED` is written last. A push that
  stops half-way leaves a folder without the marker: readers ignore it, and its number is
  never given out again (its leftovers are never mixed into a later version).
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from segflow.utils import storage

COMMIT_FILE = "_COMMITTED"


CLAIM_FILE = "_CLAIM"


def version_location(registry: str, name: str, version: int) -> str:
    return storage.join(registry, name, str(version))


def _numbered(registry: str, name: str) -> dict[int, str]:
    """Every numbered version folder of model `name`, committed or not: number -> location."""
    try:
        entries = storage.list_folder(storage.join(registry, name))
    except FileNotFoundError:
        return {}
    return {int(entry.name): entry.location for entry in entries if entry.is_dir and entry.name.isdigit()}


def next_version(registry: str, name: str) -> int:
    """One more than the highest number in use, committed or not."""
    return max(_numbered(registry, name), default=0) + 1


def read_versions(registry: str, name: str) -> list[int]:
    """The committed versions of model `name`, ascending; [] when there is none."""
    return sorted(version for version, location in _numbered(registry, name).items() if storage.exists(storage.join(location, COMMIT_FILE)))


def _record(name: str, version: int, files: list[str], source: str) -> bytes:
    record = {
        "name": name,
        "version": version,
        "files": files,
        "source": source,
        "committed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return (json.dumps(record, indent=2) + "\n").encode()


def _publish_local(source: str, registry: str, name: str, origin: str) -> str:
    model_root = Path(storage.local_path(storage.join(registry, name)))
    model_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".push-", dir=model_root))
    try:
        payload = staging / "payload"
        files = storage.upload_folder(source, str(payload))
        payload.chmod(0o755)
        while True:
            version = next_version(registry, name)
            storage.write_bytes(str(payload / COMMIT_FILE), _record(name, version, files, origin))
            try:
                os.rename(payload, model_root / str(version))
                return version_location(registry, name, version)
            except OSError as error:  # another pusher took this version first
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish_object_store(source: str, registry: str, name: str, origin: str) -> str:
    while True:
        version = next_version(registry, name)
        target = version_location(registry, name, version)
        claim = json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "source": origin}).encode()
        try:
            storage.write_bytes(storage.join(target, CLAIM_FILE), claim, exclusive=True)
            break
        except FileExistsError:  # another pusher claimed this number first
            continue
    files = storage.upload_folder(source, target)
    storage.write_bytes(storage.join(target, COMMIT_FILE), _record(name, version, files, origin))
    return target


def publish(source: str | os.PathLike[str], registry: str, name: str, origin: str | None = None) -> str:
    """Publish the local folder `source` as the next version of `name`; return its location.
    `origin` is the folder the record names as the source (default `source`), for a
    `source` that is a staging copy of it."""
    source = os.fspath(source)
    origin = origin if origin is not None else source
    if storage.is_local(registry):
        return _publish_local(source, registry, name, origin)
    return _publish_object_store(source, registry, name, origin)
