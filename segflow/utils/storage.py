"""Locations as URIs: local paths, gs:// and s3:// through one set of functions.

Nothing else in segflow may apply `pathlib` to a location that can be a URI.

Object stores go through fsspec (s3fs, gcsfs) and are configured the standard way:
for S3 the AWS_* environment variables that botocore reads (AWS_ENDPOINT_URL for a
non-AWS server, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), for GCS
the application-default credentials. Every error names the location it is about.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator

URI = re.compile(r"^[a-z][a-z0-9+.-]*://")
FILE_SCHEME = "file://"


def is_uri(location: str) -> bool:
    """True for `gs://...`, `s3://...`, `file://...`; False for plain paths."""
    return bool(URI.match(location))


def absolute(location: str, base: str | os.PathLike[str]) -> str:
    """A URI unchanged; a path made absolute against `base` (the directory segflow runs from)."""
    if is_uri(location):
        return location
    return os.path.abspath(os.path.join(os.fspath(base), os.path.expanduser(location)))


def is_local(location: str | os.PathLike[str]) -> bool:
    """True for a plain path or a `file://` URI: somewhere `open()` and `os.rename` work."""
    location = os.fspath(location)
    return not is_uri(location) or location.startswith(FILE_SCHEME)


def local_path(location: str | os.PathLike[str]) -> str:
    location = os.fspath(location)
    return location[len(FILE_SCHEME):] if location.startswith(FILE_SCHEME) else location


def join(location: str | os.PathLike[str], *parts: str) -> str:
    """`location/part/part...`: `os.path.join` for a path, `/`-joined for a URI."""
    location = os.fspath(location)
    if not is_uri(location):
        return os.path.join(location, *parts)
    pieces = [piece.strip("/") for piece in parts if piece.strip("/")]
    return "/".join([location.rstrip("/"), *pieces]) if pieces else location


def basename(location: str | os.PathLike[str]) -> str:
    """The last component of a path or URI (`s3://bucket/a/b.png` -> `b.png`)."""
    return os.fspath(location).rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class FileInfo:
    """One entry of a folder listing; `location` is usable with every function here."""

    name: str
    location: str
    size: int
    mtime: float | None
    is_dir: bool


def _filesystem(location: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for `location`; listing caches are dropped so
    that what another process or client wrote is seen."""
    import fsspec

    try:
        filesystem, path = fsspec.core.url_to_fs(location)
    except (ImportError, ValueError) as error:
        raise OSError(f"{location}: no filesystem for this location ({error})") from None
    filesystem.invalidate_cache(path)
    return filesystem, path


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "updated", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, str) and value:
            with contextlib.suppress(ValueError):
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def _named(location: str, error: BaseException, doing: str) -> OSError:
    """The same kind of OSError, with a message that names the location."""
    if isinstance(error, FileNotFoundError):
        return FileNotFoundError(f"{location}: not found")
    if isinstance(error, FileExistsError):
        return FileExistsError(f"{location}: already exists")
    kind = type(error) if isinstance(error, OSError) and type(error).__module__ == "builtins" else OSError
    reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return kind(f"{location}: {doing} ({reason})")


def list_folder(location: str | os.PathLike[str]) -> list[FileInfo]:
    """The entries directly inside a folder, sorted by name: files, subfolders (is_dir) and
    dotfiles alike; the caller decides what to skip. FileNotFoundError if it is no folder."""
    location = os.fspath(location)
    filesystem, path = _filesystem(location)
    try:
        entries = filesystem.ls(path, detail=True) if filesystem.isdir(path) else None
    except FileNotFoundError:
        entries = None
    except Exception as error:  # fsspec backends raise their own types (botocore, aiohttp)
        raise _named(location, error, "cannot list") from error
    if entries is None:
        raise FileNotFoundError(f"{location}: not a folder")
    own = path.rstrip("/")
    listing = []
    for info in entries:
        name = basename(info["name"])
        if not name or info["name"].rstrip("/") == own:  # some object stores list the folder itself
            continue
        listing.append(
            FileInfo(
                name=name,
                location=join(location, name),
                size=int(info.get("size") or 0),
                mtime=_mtime(info),
                is_dir=info.get("type") == "directory",
            )
        )
    return sorted(listing, key=lambda entry: entry.name)


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    location = os.fspath(location)
    try:
        if is_local(location):
            with open(local_path(location), "rb") as stream:
                return stream.read()
        filesystem, path = _filesystem(location)
        return filesystem.cat_file(path)
    except Exception as error:
        raise _named(location, error, "cannot read") from error


def write_bytes(location: str | os.PathLike[str], data: bytes, exclusive: bool = False) -> None:
    """Write a whole file. Local: a temporary sibling renamed into place, so a reader sees
    the old or the new content, never a part. Object stores: one PUT, equally whole.
    `exclusive`: FileExistsError if the file exists (object stores: a conditional PUT)."""
    location = os.fspath(location)
    try:
        if not is_local(location):
            filesystem, path = _filesystem(location)
            filesystem.pipe_file(path, data, mode="create" if exclusive else "overwrite")
            return
        path = local_path(location)
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
            os.chmod(temporary, 0o644)
            if exclusive:
                os.link(temporary, path)  # fails if `path` exists
                os.unlink(temporary)
            else:
                os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
    except Exception as error:
        raise _named(location, error, "cannot write") from error


def exists(location: str | os.PathLike[str]) -> bool:
    location = os.fspath(location)
    if is_local(location):
        return os.path.exists(local_path(location))
    filesystem, path = _filesystem(location)
    try:
        return bool(filesystem.exists(path))
    except Exception as error:
        raise _named(location, error, "cannot check") from error


def _files_below(folder: str) -> list[str]:
    """Relative `/`-separated paths of every file below a local folder, sorted."""
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(found)


def upload_folder(local_dir: str | os.PathLike[str], location: str | os.PathLike[str]) -> list[str]:
    """Copy every file below a local folder to `location/...` (merging into what is there);
    return the relative paths copied. Object stores have no empty folders: those are not kept."""
    local_dir, location = os.fspath(local_dir), os.fspath(location)
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(f"{local_dir}: not a folder")
    files = _files_below(local_dir)
    try:
        if is_local(location):
            shutil.copytree(local_dir, local_path(location), dirs_exist_ok=True)
        elif files:
            filesystem, path = _filesystem(location)
            filesystem.put([os.path.join(local_dir, name) for name in files], [f"{path.rstrip('/')}/{name}" for name in files])
    except Exception as error:
        raise _named(location, error, f"cannot upload {local_dir}") from error
    return files


def _download(location: str, target: str) -> None:
    filesystem, path = _filesystem(location)
    if not filesystem.isdir(path):
        filesystem.get_file(path, target)
        return
    prefix = path.rstrip("/") + "/"
    remote = [name for name in filesystem.find(path) if name.startswith(prefix)]
    local = [os.path.join(target, *name[len(prefix):].split("/")) for name in remote]
    os.makedirs(target, exist_ok=True)
    for folder in sorted({os.path.dirname(name) for name in local}):
        os.makedirs(folder, exist_ok=True)
    if remote:
        filesystem.get(remote, local)


@contextlib.contextmanager
def localized(location: str | os.PathLike[str]) -> Iterator[str]:
    """A local path for `location`: a local path as it is; a URI (file or folder) copied
    to a temporary local folder under its own name, removed when the block ends."""
    location = os.fspath(location)
    if is_local(location):
        if not os.path.exists(local_path(location)):
            raise FileNotFoundError(f"{location}: not found")
        yield local_path(location)
        return
    scratch = tempfile.mkdtemp(prefix="segflow-localized-")
    try:
        target = os.path.join(scratch, basename(location) or "data")
        try:
            if not exists(location):
                raise FileNotFoundError(f"{location}: not found")
            _download(location, target)
        except FileNotFoundError:
            raise
        except Exception as error:
            raise _named(location, error, "cannot download") from error
        yield target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
