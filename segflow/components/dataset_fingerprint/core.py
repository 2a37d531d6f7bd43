"""DatasetFingerprint: a sha256 of the dataset's image and mask folders' listings.

ExampleGen's cache key is its inputs; the folder locations alone stay the same when
images are added, changed or removed, and KFP's cache would replay the old examples.
This component runs uncached before ExampleGen and hands it the fingerprint of what the
folders hold now (every entry's name, size and modification time), so ExampleGen re-runs
when, and only when, the data changed. The same files elsewhere give the same fingerprint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from segflow.utils.io import atomic_dir, write_json
from segflow.utils.runtime import log
from segflow.utils.storage import list_folder

LISTING_FILE = "listing.json"
LISTED = ("name", "size", "mtime", "is_dir")


def folder_listing(location: str) -> list[dict[str, Any]]:
    """Every entry directly in the folder, sorted by name (dotfiles and subfolders too)."""
    return [{key: value for key, value in dataclasses.asdict(entry).items() if key in LISTED} for entry in list_folder(location)]


def fingerprint(listings: dict[str, list[dict[str, Any]]]) -> str:
    """sha256 of the sorted listings, as hex digits."""
    return hashlib.sha256(json.dumps(listings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def run(folders: dict[str, str], listing_dir: str | os.PathLike[str]) -> str:
    """Write the listings of the dataset folders (parameter name -> location; "" for a named
    split the dataset does not have) and their fingerprint to `listing_dir`; return it."""
    locations = {name: location for name, location in folders.items() if location}
    listings = {name: folder_listing(location) for name, location in locations.items()}
    digest = fingerprint(listings)
    with atomic_dir(listing_dir) as out:
        write_json(out / LISTING_FILE, {"fingerprint": digest, "locations": locations, **listings})
    log(f"dataset_fingerprint: {', '.join(f'{len(entries)} {name}' for name, entries in listings.items())} folder entries, sha256 {digest[:16]}")
    return digest
