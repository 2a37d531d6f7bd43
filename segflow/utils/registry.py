"""Decorator registries for every pluggable kind (timm style).

A registry maps a name to a factory. Duplicate names are errors, so a plugin
can never silently replace a built-in. Tests loop over each registry, which
means a newly registered entry is exercised without writing a new test.
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named factories of one kind, filled by the module that defines them."""

    def __init__(self, kind: str, module: str) -> None:
        self.kind = kind
        self._module = module
        self._entries: dict[str, T] = {}
        self._loaded = False

    def _load(self) -> None:
        # Entries are registered at import time of their defining module; import it lazily
        # so that `segflow list` or config validation never pays for unrelated imports.
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self._module)

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(entry: T) -> T:
            return self.add(name, entry)

        return decorate

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def describe(self) -> dict[str, str]:
        """One line per entry (its description or first docstring line), for `segflow list`."""
        self._load()
        out = {}
        for name in self.names():
            entry = self._entries[name]
            doc = getattr(entry, "description", None) or getattr(entry, "__doc__", None) or ""
            out[name] = doc.strip().splitlines()[0] if doc.strip() else ""
        return out


ARCHITECTURES: Registry = Registry("architecture", "segflow.model.models")
BACKBONES: Registry = Registry("backbone", "segflow.model.models")
LOSSES: Registry = Registry("loss", "segflow.model.losses")
AUGMENTATIONS: Registry = Registry("augmentation", "segflow.data.augment")
EXPORT_FORMATS: Registry = Registry("export format", "segflow.export.exporters")
OPTIMIZERS: Registry = Registry("optimizer", "segflow.train.optimizers")
SCHEDULES: Registry = Registry("schedule", "segflow.train.schedules")

REGISTRIES: dict[str, Registry] = {
    "architectures": ARCHITECTURES,
    "backbones": BACKBONES,
    "losses": LOSSES,
    "augmentations": AUGMENTATIONS,
    "exports": EXPORT_FORMATS,
    "optimizers": OPTIMIZERS,
    "schedules": SCHEDULES,
}
