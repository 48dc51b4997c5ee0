"""``PolicyStore`` (``app[POLICY]``): the policy in force, swapped whole on reload.

The request path only reads :attr:`PolicyStore.current` (one attribute load), so a reload never
blocks or tears a request: requests that started with the old policy finish with it, the next
ones see the new one. A failed reload changes nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.comfy.schemas import NodeSchemas, schemas_from_object_info
from proxy.policy.loader import PolicySet, load_policy
from proxy.policy.model import RolePolicy
from proxy.principal import Principal
from proxy.settings.auth import RoleSettings
from proxy.settings.policy import PolicySettings

_COMBINATION_LIMIT = 1024
"""Role combinations remembered; roles come from config, so this is never reached in practice."""


@dataclass(slots=True)
class _Generation:
    """One loaded policy and the per-principal combinations built from it."""

    version: int
    policy: PolicySet
    combined: dict[str, RolePolicy] = field(default_factory=dict)


class PolicyStore:
    """The compiled policy of every role, and the effective policy of each principal."""

    def __init__(self, settings: PolicySettings, roles: Mapping[str, RoleSettings]) -> None:
        """Load the configured policy.

        Raises:
            PolicyError: the policy files are invalid (every problem listed).
        """
        self.settings = settings
        self.roles = dict(roles)
        self._current = _Generation(1, load_policy(settings, self.roles))
        self._output_counts: Mapping[str, int] | None = None
        self._schemas: NodeSchemas | None = None
        self._reloading = threading.Lock()  # reloads run in worker threads, one at a time

    @property
    def version(self) -> int:
        """Incremented on every successful reload (catalog caches are keyed by it)."""
        return self._current.version

    @property
    def sources(self) -> tuple[str, ...]:
        return self._current.policy.sources

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def reload(self) -> int:
        """Read the policy files again and put them in force; returns the new version.

        Blocking (reads files): call it from a thread when the loop is serving.

        Raises:
            PolicyError: the files are invalid; the policy in force is unchanged.
        """
        with self._reloading:
            loaded = load_policy(self.settings, self.roles)
            # One assignment: a request sees the old policy or the new one, never a mix.
            self._current = _Generation(self._current.version + 1, loaded)
            return self._current.version

    def role_key(self, principal: Principal) -> str:
        """A stable, bounded cache key for principals with the same effective policy: their
        configured role names, sorted, joined by ``+`` (``""`` for none)."""
        return "+".join(sorted(r for r in principal.roles if r in self._current.policy.roles))

    def for_principal(self, principal: Principal) -> RolePolicy:
        """The effective policy of a principal (its roles combined, see ``proxy.policy.model``)."""
        return self.for_key(self.role_key(principal))

    def for_roles(self, roles: frozenset[str] | set[str] | tuple[str, ...]) -> RolePolicy:
        """The effective policy of a set of role names (unknown names are ignored)."""
        known = self._current.policy.roles
        return self.for_key("+".join(sorted(r for r in set(roles) if r in known)))

    def for_key(self, key: str) -> RolePolicy:
        generation = self._current
        cached = generation.combined.get(key)
        if cached is not None:
            return cached
        rules = generation.policy.roles
        members = tuple(rules[name] for name in key.split("+") if name in rules)
        policy = RolePolicy(
            key=key,
            members=members,
            unrestricted=any(m.unrestricted for m in members),
            version=generation.version,
        )
        if len(generation.combined) < _COMBINATION_LIMIT:
            generation.combined[key] = policy
        return policy

    # -- what the checker may know about node types (from /object_info) ----------------------

    @property
    def output_counts(self) -> Mapping[str, int] | None:
        """Number of outputs per node type, when known (set from ComfyUI's ``/object_info``
        by whoever fetched it); lets the checker refuse links to output indexes that do not
        exist. None: only ``index >= 0`` is checked."""
        return self._output_counts

    @property
    def schemas(self) -> NodeSchemas | None:
        """Every node type's inputs and outputs, from the instances' latest ``/object_info``
        (what ``proxy.comfy`` types prompts with); None until one was read."""
        return self._schemas

    def set_object_info(self, object_info: Mapping[str, Any]) -> None:
        """Learn each node type's inputs and output count from an ``/object_info`` answer."""
        counts: dict[str, int] = {}
        for class_type, info in object_info.items():
            outputs = info.get("output") if isinstance(info, dict) else None
            if isinstance(outputs, list):
                counts[class_type] = len(outputs)
        self._output_counts = counts
        self._schemas = schemas_from_object_info(object_info)


POLICY = web.AppKey("comfygate.policy", PolicyStore)
"""The workflow policy in force (swapped on reload); see ``proxy.policy.store``."""


__all__ = ["PolicyStore"]
