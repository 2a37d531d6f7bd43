"""Locations as URIs: local paths, gs:// and s3:// through one set of functions.

Nothing else in segflow may apply `pathlib` to a location that can be a URI.
"""
from __future__ import annotations

import os
import re

URI = re.compile(r"^[a-z][a-z0-9+.-]*://")


def is_uri(location: str) -> bool:
    """True for `gs://...`, `s3://...`, `file://...`; False for plain paths."""
    return bool(URI.match(location))


def absolute(location: str, base: str | os.PathLike[str]) -> str:
    """A URI unchanged; a path made absolute against `base` (the directory segflow runs from)."""
    if is_uri(location):
        return location
    return os.path.abspath(os.path.join(os.fspath(base), os.path.expanduser(location)))
