"""The model registry: versions of a model under `<registry>/<name>/<version>/`, in a local
folder or a `gs://` / `s3://` URI, and the aliases `current` (the version that serves) and
`previous`. The Pusher publishes into it and moves `current`; the Evaluator compares a
candidate with `current`. A version exists for readers only once its commit marker
`_COMMITTED` (a JSON record of the version and its files) is in it:

- local folder: the version, marker included, is assembled in a hidden temporary folder and
  renamed into place, so it appears whole or not at all, and an existing version is never
  overwritten (rename fails onto a non-empty folder);
- object store (no rename): the number is claimed by an exclusive write of `_CLAIM`, the
  payload is uploaded under `<version>/`, and `_COMMITTED` is written last. A push that
  stops half-way leaves a folder without the marker: readers ignore it, and its number is
  never given out again (its leftovers are never mixed into a later version).

Aliases move by appending a numbered record, `_aliases/<move>.json`, written exclusively
(a hard link locally, a conditional PUT on object storage) and whole (a rename, or a single
PUT): the highest record is the state. Two writers racing for the same move number cannot
both win, so a move is a compare-and-set: a push moves `current` only if it still names the
version the candidate was compared with, and the records are the aliases' history (who moved
them, when and why). Aliases only ever name committed versions. A registry from before
aliases has no records: its latest committed version counts as `current`.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from segflow.utils import storage

COMMIT_FILE = "_COMMITTED"
CLAIM_FILE = "_CLAIM"
ALIASES_FOLDER = "_aliases"
LINEAGE_FILE = "lineage.json"


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
        "aliased": True,  # pushed by a segflow that moves aliases (read_aliases)
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


def read_commit(registry: str, name: str, version: int) -> dict[str, Any]:
    """The commit record of a committed version; FileNotFoundError naming it otherwise."""
    location = storage.join(version_location(registry, name, version), COMMIT_FILE)
    try:
        return dict(json.loads(storage.read_bytes(location)))
    except FileNotFoundError:
        raise FileNotFoundError(f"{name} version {version} is not a committed version in {registry}") from None


def read_lineage(registry: str, name: str, version: int) -> dict[str, Any] | None:
    """lineage.json of a version; None for one pushed before lineage was recorded."""
    location = storage.join(version_location(registry, name, version), LINEAGE_FILE)
    return dict(json.loads(storage.read_bytes(location))) if storage.exists(location) else None


@dataclass(frozen=True)
class Aliases:
    """The aliases after alias move `move` (0: never moved; `current` is then the latest version
    committed before aliases existed, or None)."""

    move: int
    current: int | None
    previous: int | None
    moved_at: str | None = None
    by: str | None = None
    reason: str | None = None


class AliasMoved(RuntimeError):
    """`current` no longer names the version a move was conditioned on."""


def _alias_records(registry: str, name: str) -> dict[int, str]:
    try:
        entries = storage.list_folder(storage.join(registry, name, ALIASES_FOLDER))
    except FileNotFoundError:
        return {}
    return {int(entry.name.removesuffix(".json")): entry.location for entry in entries if entry.name.removesuffix(".json").isdigit()}


def _read_move(location: str) -> Aliases:
    record = json.loads(storage.read_bytes(location))
    return Aliases(**{key: record.get(key) for key in Aliases.__dataclass_fields__})


def read_aliases(registry: str, name: str) -> Aliases:
    """The aliases of model `name` now."""
    records = _alias_records(registry, name)
    if not records:
        from_before = [version for version in read_versions(registry, name) if not read_commit(registry, name, version).get("aliased")]
        return Aliases(move=0, current=from_before[-1] if from_before else None, previous=None)
    return _read_move(records[max(records)])


def alias_history(registry: str, name: str) -> list[Aliases]:
    """Every alias move, oldest first."""
    records = _alias_records(registry, name)
    return [_read_move(records[move]) for move in sorted(records)]


ANY_CURRENT = -1  # move_current's `expected` when the move is unconditional


def move_current(registry: str, name: str, version: int, *, expected: int | None, by: str, reason: str) -> Aliases:
    """Make committed `version` `current` (and the version it replaces `previous`), if `current`
    is still `expected` (ANY_CURRENT: whatever it is); AliasMoved otherwise. Returns the new
    aliases. Safe against concurrent movers: exactly one of two racing moves gets each record."""
    read_commit(registry, name, version)  # only committed versions are ever named
    while True:
        now = read_aliases(registry, name)
        if expected != ANY_CURRENT and now.current != expected:
            raise AliasMoved(f"current of {name!r} is version {now.current}, not {expected}: {now.by or 'another push'} moved it ({now.reason or 'no reason given'})")
        previous = now.previous if now.current == version else now.current
        moved = Aliases(
            move=now.move + 1,
            current=version,
            previous=previous,
            moved_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            by=by,
            reason=reason,
        )
        target = storage.join(registry, name, ALIASES_FOLDER, f"{moved.move:08d}.json")
        try:
            storage.write_bytes(target, (json.dumps(asdict(moved), indent=2) + "\n").encode(), exclusive=True)
            return moved
        except FileExistsError:  # another mover took this move number: read again and decide again
            continue


def rollback(registry: str, name: str, *, by: str, reason: str = "rollback") -> Aliases:
    """Make `previous` `current` again (and the version rolled back from `previous`)."""
    now = read_aliases(registry, name)
    if now.previous is None:
        raise ValueError(f"{name!r} in {registry} has no previous version to roll back to (current: {now.current})")
    return move_current(registry, name, now.previous, expected=now.current, by=by, reason=reason)


def version_rows(registry: str, name: str) -> list[dict[str, Any]]:
    """One row per committed version, oldest first, for `segflow registry list`: when it was
    committed, whether it was blessed, its eval mean IoU, the version it was warm-started
    from, and the aliases that name it."""
    aliases = read_aliases(registry, name)
    named = {version: alias for alias, version in (("previous", aliases.previous), ("current", aliases.current)) if version is not None}
    rows = []
    for version in read_versions(registry, name):
        lineage = read_lineage(registry, name, version) or {}
        blessing = lineage.get("blessing") or {}
        rows.append(
            {
                "version": version,
                "created": read_commit(registry, name, version).get("committed_at"),
                "blessed": blessing.get("blessed"),
                "mean_iou": (lineage.get("metrics") or {}).get("mean_iou"),
                "parent": lineage.get("parent"),
                "alias": named.get(version),
            }
        )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """`segflow registry list`'s table; `-` where a version recorded nothing (pushed before lineage)."""
    header = ("version", "created", "blessed", "mean_iou", "parent", "alias")

    def cell(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key == "mean_iou":
            return f"{value:.4f}"
        if key == "blessed":
            return "yes" if value else "no"
        return str(value)

    table = [header, *(tuple(cell(key, row[key]) for key in header) for row in rows)]
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    return "".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() + "\n" for line in table)
