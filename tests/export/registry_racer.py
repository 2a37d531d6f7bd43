"""One of the racing pushers of test_model_registry, in a module of its own: a spawned process
imports it, and it imports only the registry (not TensorFlow, which the test module's imports bring)."""
from __future__ import annotations

import os
from typing import Any

from segflow.export import model_registry as registry
from segflow.utils import storage


def race(root: str, payload: str, rounds: int, barrier: Any, results: Any) -> None:
    """One of two racing pushers: each round, read `current`, publish, and move `current`
    conditioned on what it read."""
    for _ in range(rounds):
        barrier.wait()
        seen = registry.read_aliases(root, "raced").current
        version = int(storage.basename(registry.publish(payload, root, "raced")))
        try:
            registry.move_current(root, "raced", version, expected=seen, by=f"pid {os.getpid()}", reason=f"expected {seen}")
            results.put((version, seen, True))
        except registry.AliasMoved:
            results.put((version, seen, False))


