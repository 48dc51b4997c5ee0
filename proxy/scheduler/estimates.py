"""Execution-time estimates per instance and workflow shape (pure).

A workflow's *shape* is its sorted set of node types: two prompts of one shape differ in seeds
and prompts, rarely in cost. Each measured run updates an exponential moving average for
``(instance, shape)`` and for ``shape`` on any instance; an estimate falls back from the first
to the second to the configured default.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

ALPHA = 0.3
"""Weight of the newest run: recent enough to follow a model change, smooth over noise."""
MAX_SECONDS = 24 * 3600.0
"""A measured run longer than this is clamped (a prompt stuck on a dead instance)."""


def shape_of(class_types: Iterable[str]) -> str:
    """The shape key of a workflow from its nodes' types (short, stable across processes)."""
    joined = "\0".join(sorted(set(class_types)))
    return hashlib.blake2b(joined.encode(), digest_size=8).hexdigest()


class Estimates:
    """Moving averages of measured execution times (see the module doc)."""

    def __init__(self, default_seconds: float) -> None:
        self.default = default_seconds
        self.values: dict[str, float] = {}

    @staticmethod
    def key(instance: str, shape: str) -> str:
        return f"{instance}|{shape}"

    def seconds(self, shape: str, instance: str | None = None) -> float:
        if instance is not None and (v := self.values.get(self.key(instance, shape))) is not None:
            return v
        return self.values.get(self.key("*", shape), self.default)

    def observe(self, instance: str, shape: str, seconds: float) -> dict[str, float]:
        """Fold one run in; the entries that changed (to share with other replicas)."""
        seconds = min(max(0.0, seconds), MAX_SECONDS)
        changed: dict[str, float] = {}
        for key in (self.key(instance, shape), self.key("*", shape)):
            old = self.values.get(key)
            new = seconds if old is None else old + ALPHA * (seconds - old)
            self.values[key] = changed[key] = new
        return changed

    def merge(self, values: dict[str, float]) -> None:
        self.values.update(values)


__all__ = ["Estimates", "shape_of"]
