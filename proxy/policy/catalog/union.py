"""One catalog for several ComfyUI instances (issue 8): ``/object_info`` and the model lists
as the union of what the reachable instances offer.

``/object_info``: each instance keeps its own cache (:class:`~proxy.policy.catalog.cache.
ObjectInfoCache`, stale-while-revalidate per instance). :func:`gather_snapshots` takes what
each reachable instance's cache holds; an instance without a copy yet is fetched, and waited
for at most ``upstream.merge_timeout_seconds`` (a slow or dead instance degrades the answer,
it never blocks it: its fetch goes on in the background and joins the union when it lands).
:class:`UnionView` keeps the union of those copies, keyed by the tuple of per-instance snapshot
identities ``((name, generation), ...)``: a refresh of any instance, or one joining or leaving,
is a new key and a new union (a new *union generation*). Its role copies are kept per (policy
version, role key) within a generation, exactly like one instance's.

When only one instance contributes, its own cache answers (its bytes, its copies): a union of
one would only re-serialize them.

Model lists (``/models/{folder}``, ``/embeddings``, ``/experiment/models/{folder}``) are small
and not cached: they are asked of every reachable instance in parallel (``merge.ask``), their
lists united here (:func:`union_names`, :func:`union_entries`), then filtered by the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.errors import ProxyError
from proxy.policy.catalog.cache import (
    MAX_COPIES,
    Answer,
    Miss,
    ObjectInfoCache,
    Rendered,
    Snapshot,
    render,
)
from proxy.policy.catalog.filter import filter_object_info, model_classes, union_object_info
from proxy.policy.model import RolePolicy


class Copies(Protocol):
    """Where a role's ready-to-send copy of a snapshot comes from (an instance's cache, or the
    union view)."""

    def copy_for(
        self, snapshot: Snapshot, policy: RolePolicy, version: int, role_key: str
    ) -> Rendered: ...


@dataclass(slots=True)
class Part:
    """One instance's contribution: its cache and the copy it holds."""

    name: str
    cache: ObjectInfoCache
    snapshot: Snapshot


@dataclass(slots=True)
class Gathered:
    """What the reachable instances' caches hold for one request."""

    parts: list[Part] = field(default_factory=list)
    failure: Answer | ProxyError | None = None
    """The first instance failure (in instance order) when some instance had no copy."""
    missing: list[str] = field(default_factory=list)
    """Instances left out of the answer (no copy, and failed or still fetching)."""
    outcome: str = "hit"
    """For ``catalog_answers``: ``miss`` when some fetch was waited for, ``stale`` when a copy
    past its TTL was used (its refresh started), else ``hit``."""
    seconds: float = 0.0
    """Time spent waiting for instances' fetches."""


async def gather_snapshots(
    caches: Sequence[tuple[str, ObjectInfoCache]],
    policy_version: int,
    miss: Miss,
    *,
    within: float,
) -> Gathered:
    """The copies of ``caches`` (instance name, cache), in that order.

    A cache with a copy answers at once (and starts its own refresh when the copy is stale or
    the policy was reloaded). A cache without one (or with a TTL of 0) fetches, sent as the
    client's request ``miss``; those fetches are waited for together, at most ``within``
    seconds. A fetch not done by then keeps going in its cache; the answer goes on without it.
    """
    gathered = Gathered()
    waiting: dict[str, asyncio.Future[Snapshot | Answer]] = {}
    ready: dict[str, Snapshot] = {}
    for name, cache in caches:
        snapshot = cache.snapshot
        if snapshot is not None and cache.ttl > 0:
            if cache.clock() - snapshot.fetched_at >= cache.ttl:
                gathered.outcome = "stale"
            current = await cache.current(policy_version)  # never waits with a copy in hand
            if isinstance(current, Snapshot):
                ready[name] = current
        else:
            waiting[name] = asyncio.ensure_future(cache.current(policy_version, miss))
    if waiting:
        gathered.outcome = "miss"
        started = time.perf_counter()
        try:
            await asyncio.wait(waiting.values(), timeout=within)
        finally:
            for future in waiting.values():
                # Only this request stops waiting: the fetch itself is shielded in its cache.
                if not future.done():
                    future.cancel()
                future.add_done_callback(_consume)
            gathered.seconds = time.perf_counter() - started
    for name, cache in caches:
        snapshot = ready.get(name)
        fetch = waiting.get(name)
        if fetch is not None and fetch.done() and not fetch.cancelled():
            error = fetch.exception()
            if error is None:
                outcome = fetch.result()
                if isinstance(outcome, Snapshot):
                    snapshot = outcome
                elif gathered.failure is None:
                    gathered.failure = outcome  # ComfyUI's error answer (not cached)
            elif isinstance(error, ProxyError):
                if gathered.failure is None:
                    gathered.failure = error
            else:
                raise error
        if snapshot is None and fetch is not None:
            snapshot = cache.snapshot  # TTL 0, or a stale copy while its fetch runs late
        if snapshot is None:
            gathered.missing.append(name)
        else:
            gathered.parts.append(Part(name, cache, snapshot))
    return gathered


class UnionView:
    """The union of the instances' ``/object_info`` copies, and its role copies.

    Rebuilt when its key (the instances' names and snapshot generations, in order) changes;
    everything here runs without awaiting, so concurrent requests see one union per key.
    """

    def __init__(self) -> None:
        self._key: tuple[tuple[str, int], ...] = ()
        self._snapshot: Snapshot | None = None
        self._generation = 0
        self._copies: dict[tuple[int, str], Rendered] = {}
        self.builds = 0
        """Unions computed (introspection for tests)."""

    @property
    def generation(self) -> int:
        """The union generation (one per distinct key seen)."""
        return self._generation

    def view(self, parts: Sequence[Part]) -> tuple[Snapshot, Copies]:
        """The snapshot to answer from and where its role copies come from: the instance's own
        cache for a single part, else the union (recomputed only when the key changed)."""
        if len(parts) == 1:
            return parts[0].snapshot, parts[0].cache
        key = tuple((p.name, p.snapshot.generation) for p in parts)
        snapshot = self._snapshot
        if snapshot is None or key != self._key:
            snapshot = self._build(parts)
            self._key = key
            self._snapshot = snapshot
            self._copies = {}
        return snapshot, self

    def copy_for(
        self, snapshot: Snapshot, policy: RolePolicy, version: int, role_key: str
    ) -> Rendered:
        """The filtered copy of the union ``snapshot`` for principals with this policy: one per
        (policy version, role key, union generation)."""
        if self._snapshot is None or snapshot.generation != self._snapshot.generation:
            # The union moved on while this request was being answered: answer, keep nothing.
            return _filtered(snapshot, policy)
        key = (version, role_key)
        rendered = self._copies.get(key)
        if rendered is None:
            if len(self._copies) >= MAX_COPIES or any(v != version for v, _ in self._copies):
                # A policy reload makes every copy of the older version obsolete at once.
                self._copies = {k: r for k, r in self._copies.items() if k[0] == version}
                if len(self._copies) >= MAX_COPIES:
                    self._copies.clear()
            rendered = self._copies[key] = _filtered(snapshot, policy)
        return rendered

    def _build(self, parts: Sequence[Part]) -> Snapshot:
        self._generation += 1
        self.builds += 1
        info = union_object_info([p.snapshot.info for p in parts])
        first = parts[0].snapshot
        return Snapshot(
            generation=self._generation,
            info=info,
            raw=render(info, first.raw.content_type),
            # The proxy compresses when ComfyUI does: the instances are configured alike, the
            # first (home) one decides.
            compressed=first.compressed,
            fetched_at=min(p.snapshot.fetched_at for p in parts),
            models=model_classes(info),
        )


def _filtered(snapshot: Snapshot, policy: RolePolicy) -> Rendered:
    info = filter_object_info(snapshot.info, policy, snapshot.models)
    return render(info, snapshot.raw.content_type)


# -- model lists -------------------------------------------------------------------------------


def union_names(lists: Iterable[list[Any]]) -> list[Any]:
    """``/models/{folder}`` and ``/embeddings`` of several instances: every name once, sorted
    as ComfyUI sorts its own list (``sorted(set(...))``); entries that are not names (none in
    ComfyUI's answers) are kept once, after them."""
    names: set[str] = set()
    others: list[Any] = []
    for items in lists:
        for item in items:
            if isinstance(item, str):
                names.add(item)
            elif item not in others:
                others.append(item)
    return [*sorted(names), *others]


def union_entries(lists: Iterable[list[Any]]) -> list[Any]:
    """``/experiment/models/{folder}`` of several instances: one entry per model name, the
    first instance's (home first), in the order they came."""
    seen: set[str] = set()
    out: list[Any] = []
    for entries in lists:
        for entry in entries:
            name = entry.get("name") if isinstance(entry, dict) else None
            if isinstance(name, str):
                if name in seen:
                    continue
                seen.add(name)
            out.append(entry)
    return out


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        with contextlib.suppress(BaseException):
            future.exception()
